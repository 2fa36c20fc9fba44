"""XM3600 retrieval from a tiny captions.jsonl + images/<key>.jpg, tokenized by a SentencePiece
model trained here: R@1/5/10 and ranks per language and averaged, against brute force."""
import json

import numpy as np
import pytest
import sentencepiece as spm

from configs import demo, evals
from local_bench_fixtures import PP, Towers, write_image
from mmcl import evaluate
from mmcl.data import tokenizers
from mmcl.evaluate import predict, xm3600
from mmcl.parallel import mesh as mesh_lib

TEXT_LEN = 16
LANGS = ('de', 'en', 'ja')
CAPTIONS = {
    'de': ['ein Hund läuft am Strand', 'zwei Katzen sitzen hier', 'ein rotes Auto',
           'Kinder spielen im Park', 'eine alte Brücke', 'ein Boot auf dem See',
           'ein Mann mit Hut', 'Blumen im Garten', 'ein Vogel fliegt', 'Schnee auf Bergen'],
    'en': ['a dog runs on the beach', 'two cats sit here', 'a red car', 'kids play in a park',
           'an old bridge', 'a boat on the lake', 'a man with a hat', 'flowers in a garden',
           'a bird flies', 'snow on mountains'],
    'ja': ['犬がビーチを走る', '二匹の猫', '赤い車', '公園で遊ぶ子供', '古い橋', '湖のボート',
           '帽子の男', '庭の花', '鳥が飛ぶ', '山の雪'],
}


@pytest.fixture(scope='module')
def sp_model(tmp_path_factory):
  prefix = tmp_path_factory.mktemp('sp') / 'multilingual'
  spm.SentencePieceTrainer.train(
      sentence_iterator=iter([c for cs in CAPTIONS.values() for c in cs]),
      model_prefix=str(prefix), vocab_size=96, character_coverage=1.0,
      hard_vocab_limit=False, minloglevel=2)
  return f'{prefix}.model'


@pytest.fixture(scope='module')
def xm_root(tmp_path_factory):
  """12 images; captions drawn from the pools; image 11 has no Japanese caption."""
  root = tmp_path_factory.mktemp('xm3600')
  rng = np.random.default_rng(3)
  lines = []
  for i in range(12):
    key = f'{i:03x}f7dd4f0411001f'
    write_image(root / 'images' / f'{key}.jpg', i + 2, size=(24, 18))
    line = {'image/key': key, 'image/locale': 'en'}
    for lang in LANGS + ('fr',):
      if lang == 'ja' and i == 11:
        continue
      pool = CAPTIONS.get(lang, CAPTIONS['en'])
      caps = [f'{pool[(i + j) % len(pool)]} {i}' for j in range(1 + int(rng.integers(2)))]
      line[lang] = {'caption': caps, 'caption/tokenized': caps,
                    'caption/tokenized/lowercase': [c.lower() for c in caps]}
    lines.append(line)
  (root / 'captions.jsonl').write_text(
      '\n'.join(json.dumps(l, ensure_ascii=False) for l in lines) + '\n')
  return root, lines


def sp_rows(model_path, texts):
  """Token rows straight from sentencepiece: ids, EOS, truncated keeping EOS, 0-padded."""
  sp = spm.SentencePieceProcessor(model_file=model_path)
  out = np.zeros((len(texts), TEXT_LEN), np.int32)
  for n, t in enumerate(texts):
    ids = sp.encode(t)[:TEXT_LEN - 1] + [sp.eos_id()]
    out[n, :len(ids)] = ids
  return out


def brute_force(zimg, ztxt, image_of_text, prefix):
  """Ranks by definition: candidates scoring strictly higher than the best own one."""
  s = zimg @ ztxt.T
  i2t = [sum(s[i, j] > max(s[i, k] for k in range(len(ztxt)) if image_of_text[k] == i)
             for j in range(len(ztxt)))
         for i in range(len(zimg)) if i in set(image_of_text)]
  t2i = [sum(s[i, j] > s[image_of_text[j], j] for i in range(len(zimg)))
         for j in range(len(ztxt))]
  out = {}
  for d, ranks in (('i2t', np.array(i2t)), ('t2i', np.array(t2i))):
    for k in (1, 5, 10):
      out[f'{prefix}/{d}_r{k}'] = float(np.mean(ranks < k))
    out[f'{prefix}/{d}_mean_rank'] = float(np.mean(ranks + 1))
    out[f'{prefix}/{d}_median_rank'] = float(np.median(ranks + 1))
  return out


def test_xm3600_with_sentencepiece_matches_brute_force(sp_model, xm_root):
  root, lines = xm_root
  c = demo.get_config('tiny')
  c.tokenizer, c.text_len = f'sp:{sp_model}', TEXT_LEN
  c.evals = evals.xm3600(str(root), languages=LANGS, pp_img=PP, batch_size=4)
  vocab = tokenizers.get_tokenizer(c.tokenizer).vocab_size
  towers = Towers(vocab, TEXT_LEN, seed=4)
  pred = predict.Predictor(towers.model, mesh_lib.create_mesh([('data', -1)]))
  ev, _ = evaluate.build_evaluators(c, pred)['xm3600']
  assert isinstance(ev, xm3600.XM3600Evaluator)
  assert isinstance(ev.tokenizer, tokenizers.SentencePieceTokenizer)  # The config's.
  metrics = ev.run({})

  zimg = np.stack([towers.image(i + 2) for i in range(len(lines))])
  expected = {}
  for lang in LANGS:
    texts = [t for l in lines for t in l.get(lang, {}).get('caption', [])]
    image_of_text = [i for i, l in enumerate(lines) for _ in l.get(lang, {}).get('caption', [])]
    ztxt = towers.texts(sp_rows(sp_model, texts))
    expected.update(brute_force(zimg, ztxt, image_of_text, f'retrieval/xm3600/{lang}'))
  for k in [k.split('/', 3)[3] for k in expected if k.startswith('retrieval/xm3600/de/')]:
    expected[f'retrieval/xm3600/avg/{k}'] = float(np.mean(
        [expected[f'retrieval/xm3600/{lang}/{k}'] for lang in LANGS]))
  assert metrics.keys() == expected.keys()
  for k, v in expected.items():
    assert metrics[k] == pytest.approx(v, abs=1e-12), k
  r1 = [v for k, v in expected.items() if k.endswith('_r1')]
  assert any(0 < v < 1 for v in r1), r1  # The reference is informative, not 0 or 1 throughout.


def test_xm3600_defaults_to_36_languages_and_rejects_unknown_ones(sp_model, xm_root):
  root, _ = xm_root
  assert len(xm3600.LANGUAGES) == 36
  assert evals.xm3600(str(root))['xm3600']['languages'] == list(xm3600.LANGUAGES)
  pred = predict.Predictor(Towers(8, TEXT_LEN).model, mesh_lib.create_mesh([('data', -1)]))
  kw = dict(pp_img=PP, tokenizer=f'sp:{sp_model}', text_len=TEXT_LEN)
  with pytest.raises(ValueError, match=r"\['xx'\]; valid: \['ar', 'bn'"):
    xm3600.XM3600Evaluator(pred, root=str(root), languages=['de', 'xx'], **kw)
  assert xm3600.XM3600Evaluator(pred, root=str(root), languages='ja', **kw).languages == ('ja',)
  with pytest.raises(ValueError, match="no 'ar' captions"):  # The fixture has 4 languages.
    xm3600.XM3600Evaluator(pred, root=str(root), **kw)
  with pytest.raises(FileNotFoundError, match='captions.jsonl not found'):
    xm3600.XM3600Evaluator(pred, root=str(root / 'images'), **kw)
