"""Retrieval from Karpathy's released split files (Flickr30k's dataset_flickr30k.json layout):
R@1/5/10, ranks and summaries of the test split against brute force."""
import json

import numpy as np
import pytest

from configs import demo, evals
from local_bench_fixtures import PP, Towers, write_image
from mmcl import evaluate
from mmcl.data import tokenizers
from mmcl.evaluate import karpathy, predict
from mmcl.parallel import mesh as mesh_lib
from test_xm3600 import brute_force

WORDS = ('dog', 'cat', 'car', 'boat', 'tree', 'hat', 'bird', 'snow', 'park', 'bridge')


@pytest.fixture(scope='module')
def flickr_root(tmp_path_factory):
  """9 test images with 1-3 captions (words overlap across images), 3 train images."""
  root = tmp_path_factory.mktemp('flickr30k')
  rng = np.random.default_rng(5)
  images = []
  for i in range(12):
    name = f'{1000 + i}.jpg'
    write_image(root / 'flickr30k-images' / name, i + 1, size=(22, 16))
    sentences = [{'raw': f'a {WORDS[(i + j) % 10]} and a {WORDS[(2 * i + j) % 10]} ',
                  'tokens': []} for j in range(1 + int(rng.integers(3)))]
    images.append({'filename': name, 'imgid': i, 'split': 'train' if i % 4 == 3 else 'test',
                   'sentences': sentences, 'sentids': list(range(len(sentences)))})
  (root / 'dataset_flickr30k.json').write_text(json.dumps({'images': images,
                                                           'dataset': 'flickr30k'}))
  return root, images


def test_flickr30k_test_split_matches_brute_force(flickr_root):
  root, images = flickr_root
  c = demo.get_config('tiny')
  c.evals = evals.flickr30k_retrieval(str(root), pp_img=PP, batch_size=4)
  tok = tokenizers.get_tokenizer(c.tokenizer)
  towers = Towers(tok.vocab_size, c.text_len, seed=6)
  pred = predict.Predictor(towers.model, mesh_lib.create_mesh([('data', -1)]))
  ev, _ = evaluate.build_evaluators(c, pred)['retrieval_flickr30k']
  assert isinstance(ev, karpathy.KarpathyRetrievalEvaluator)
  metrics = ev.run({})

  test = [(i, im) for i, im in enumerate(images) if im['split'] == 'test']
  zimg = np.stack([towers.image(i + 1) for i, _ in test])
  texts = [s['raw'].strip() for _, im in test for s in im['sentences']]
  image_of_text = [n for n, (_, im) in enumerate(test) for _ in im['sentences']]
  ztxt = towers.texts(tok.tokenize(texts, c.text_len))
  expected = brute_force(zimg, ztxt, image_of_text, 'retrieval/flickr30k')
  p = 'retrieval/flickr30k'
  expected[f'{p}/mean_r1'] = (expected[f'{p}/i2t_r1'] + expected[f'{p}/t2i_r1']) / 2
  expected[f'{p}/mean_recall'] = float(np.mean(
      [expected[f'{p}/{d}_r{k}'] for d in ('i2t', 't2i') for k in (1, 5, 10)]))
  assert metrics.keys() == expected.keys()
  for k, v in expected.items():
    assert metrics[k] == pytest.approx(v, abs=1e-12), k
  assert 0 < expected[f'{p}/t2i_r1'] < 1  # Informative: neither all hits nor none.


def test_bad_split_and_files_are_clear_errors(flickr_root, tmp_path):
  root, _ = flickr_root
  pred = predict.Predictor(Towers(8, 8).model, mesh_lib.create_mesh([('data', -1)]))
  kw = dict(pp_img=PP, tokenizer='bytes', text_len=8, image_dir=str(root / 'flickr30k-images'))
  ann = str(root / 'dataset_flickr30k.json')
  with pytest.raises(ValueError, match=r"Unknown Karpathy split 'testing'; valid: \['train'"):
    karpathy.KarpathyRetrievalEvaluator(pred, annotations=ann, split='testing', **kw)
  with pytest.raises(ValueError, match=r"no images in split 'val'; splits there: \['test', "
                                       r"'train'\]"):
    karpathy.KarpathyRetrievalEvaluator(pred, annotations=ann, split='val', **kw)
  with pytest.raises(FileNotFoundError, match='not found'):
    karpathy.KarpathyRetrievalEvaluator(pred, annotations=str(tmp_path / 'none.json'), **kw)
  bad = tmp_path / 'bad.json'
  bad.write_text(json.dumps({'images': [{'filename': 'x.jpg', 'split': 'test'}]}))
  with pytest.raises(ValueError, match=r"lacks \['sentences'\]"):
    karpathy.KarpathyRetrievalEvaluator(pred, annotations=str(bad), **kw)
