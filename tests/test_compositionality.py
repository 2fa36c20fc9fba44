"""SugarCrepe, ARO and Winoground from tiny files in their released formats, each metric
against a brute-force float64 computation from the stub towers' known embeddings."""
import itertools
import json
import os
import re
import socket
import subprocess
import sys

import numpy as np
import pytest

from configs import demo, evals
from local_bench_fixtures import PP, Towers, write_image
from mmcl import evaluate
from mmcl.data import tokenizers
from mmcl.evaluate import aro, local_files, predict, sugarcrepe, winoground
from mmcl.parallel import mesh as mesh_lib

TEXT_LEN = 48
KW = dict(pp_img=PP, tokenizer='bytes', text_len=TEXT_LEN, batch_size=4)


@pytest.fixture(scope='module')
def towers():
  return Towers(tokenizers.get_tokenizer('bytes').vocab_size, TEXT_LEN)


@pytest.fixture(scope='module')
def predictor(towers):
  return predict.Predictor(towers.model, mesh_lib.create_mesh([('data', -1)]))


def ref_texts(towers, texts):
  return towers.texts(tokenizers.get_tokenizer('bytes').tokenize(texts, TEXT_LEN))


def cos(towers, color, text):
  return float(towers.image(color) @ ref_texts(towers, [text])[0])


def assert_informative(values):
  """Guards the references themselves: a metric stuck at 0 or 1 would check little."""
  assert any(0.0 < v < 1.0 for v in values), values


# --- SugarCrepe ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def sugarcrepe_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('sugarcrepe')
  colors = {f'0000000{i:05d}.jpg': i + 3 for i in range(5)}
  for i, (name, c) in enumerate(colors.items()):
    write_image(root / 'val2017' / name, c, size=(20 + i, 14 + 2 * i))
  rng = np.random.default_rng(1)
  names = list(colors)
  for cat in sugarcrepe.CATEGORIES:
    # Positives repeat across categories (as COCO captions do): embedded once, scored twice.
    data = {str(i): dict(filename=names[rng.integers(5)], caption=f'a photo number {i}.',
                         negative_caption=f'{cat}: negative {i}') for i in range(4)}
    (root / f'{cat}.json').write_text(json.dumps(data))
  return root, colors


def test_sugarcrepe_matches_brute_force(predictor, towers, sugarcrepe_root):
  root, colors = sugarcrepe_root
  ev = sugarcrepe.SugarCrepeEvaluator(predictor, root=str(root), **KW)
  metrics = ev.run({})
  expected = {}
  for cat in sugarcrepe.CATEGORIES:
    data = json.loads((root / f'{cat}.json').read_text())
    hits = [cos(towers, colors[v['filename']], v['caption']) >
            cos(towers, colors[v['filename']], v['negative_caption']) for v in data.values()]
    expected[f'sugarcrepe/{cat}'] = sum(hits) / len(hits)
  for group in ('add', 'replace', 'swap'):
    accs = [v for k, v in expected.items() if k.startswith(f'sugarcrepe/{group}_')]
    expected[f'sugarcrepe/{group}'] = sum(accs) / len(accs)
  expected['sugarcrepe/mean'] = sum(expected[f'sugarcrepe/{c}']
                                    for c in sugarcrepe.CATEGORIES) / 7
  assert metrics.keys() == expected.keys()
  for k, v in expected.items():
    assert metrics[k] == pytest.approx(v, abs=1e-12), k
  assert_informative(expected.values())


def test_images_embed_to_their_own_colour(predictor, towers, sugarcrepe_root):
  """The image path: decode, pp, batches padded to the shards, dedup, order kept."""
  root, colors = sugarcrepe_root
  ev = sugarcrepe.SugarCrepeEvaluator(predictor, root=str(root), categories=['add_att'], **KW)
  names = list(colors)[::-1] + list(colors)[:2]
  z, row = ev.embed_images({}, [str(root / 'val2017' / n) for n in names])
  assert z.shape == (5, 8) and list(row) == [0, 1, 2, 3, 4, 4, 3]
  np.testing.assert_allclose(z[row], np.stack([towers.image(colors[n]) for n in names]),
                             rtol=1e-5, atol=1e-6)


def test_sugarcrepe_bad_input(predictor, sugarcrepe_root, tmp_path):
  root, _ = sugarcrepe_root
  with pytest.raises(ValueError, match=r"\['swap_rel'\].*valid:.*'add_att'"):
    sugarcrepe.SugarCrepeEvaluator(predictor, root=str(root), categories=['swap_rel'], **KW)
  with pytest.raises(FileNotFoundError, match='add_att.json not found'):
    sugarcrepe.SugarCrepeEvaluator(predictor, root=str(tmp_path), **KW)
  (tmp_path / 'add_att.json').write_text(json.dumps({'0': {'filename': 'x.jpg'}}))
  with pytest.raises(ValueError, match=r"entry 0 lacks \['caption', 'negative_caption'\]"):
    sugarcrepe.SugarCrepeEvaluator(predictor, root=str(tmp_path), categories=['add_att'],
                                   **KW)
  ev = sugarcrepe.SugarCrepeEvaluator(predictor, root=str(root), image_dir=str(tmp_path),
                                      categories=['add_att'], **KW)
  with pytest.raises(FileNotFoundError, match='image.*not found.*image_dir'):
    ev.run({})


# --- ARO ----------------------------------------------------------------------------------

# Each VG image is two coloured halves on a background; a box selects one half.
_VG_IMAGES = {'2316811.jpg': (9, 10), '2340001.jpg': (11, 12), '2400002.jpg': (13, 14)}


def _vg_entry(rng, i, extra):
  name = list(_VG_IMAGES)[i % 3]
  half = int(rng.integers(2))
  box = dict(bbox_x=4 + 20.4 * half, bbox_y=3.2, bbox_w=19.6, bbox_h=24.0)
  return dict(image_id=i, image_path=name, true_caption=f'the {i} is {extra} the thing',
              false_caption=f'the thing is {extra} the {i}', color=_VG_IMAGES[name][half],
              **box)


@pytest.fixture(scope='module')
def aro_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('aro')
  for name, (a, b) in _VG_IMAGES.items():
    write_image(root / 'images' / name, 0, size=(48, 30),
                patches=(((4, 3, 24, 27), a), ((24, 3, 44, 27), b)))
  rng = np.random.default_rng(2)
  relations = ['on', 'holding', 'next to', 'wearing']  # 'next to' is excluded by ARO.
  rel = [dict(_vg_entry(rng, i, relations[i % 4]), relation_name=relations[i % 4])
         for i in range(16)]
  pairs = [['white', 'black']] * 6 + [['red', 'blue']] * 3
  att = [dict(_vg_entry(rng, i, '+'.join(p)), attributes=p) for i, p in enumerate(pairs)]
  (root / 'visual_genome_relation.json').write_text(json.dumps(rel))
  (root / 'visual_genome_attribution.json').write_text(json.dumps(att))
  coco = [dict(image=f'val2014/COCO_val2014_00000000{i}.jpg', image_id=i,
               caption=[f'A dog, number {i}, runs on the Beach.', f'two cats sit {i} here!'])
          for i in range(3)]
  flickr = [dict(image=f'flickr30k-images/{100 + i}.jpg',
                 caption=[f'A man in a red shirt climbs rock {i}.']) for i in range(2)]
  colors = {d['image']: 15 + i for i, d in enumerate(coco + flickr)}
  for path, c in colors.items():
    write_image(root / path, c, size=(18, 22))
  (root / 'coco_karpathy_test.json').write_text(json.dumps(coco))
  (root / 'flickr30k_test.json').write_text(json.dumps(flickr))
  return root, colors


def test_aro_matches_brute_force(predictor, towers, aro_root):
  aro_root, order_colors = aro_root
  assert 'next to' in aro.excluded_relations() and 'on' not in aro.excluded_relations()
  ev = aro.AroEvaluator(predictor, root=str(aro_root), min_attribute_count=5, **KW)
  metrics = ev.run({})
  expected = {}
  for task, keep in (('vg_relation', lambda g, n: g != 'next to'),
                     ('vg_attribution', lambda g, n: n >= 5)):
    data = json.loads((aro_root / aro.TASKS[task]).read_text())
    groups = {}
    for d in data:
      hit = cos(towers, d['color'], d['true_caption']) > cos(towers, d['color'],
                                                               d['false_caption'])
      groups.setdefault(d.get('relation_name') or tuple(d['attributes']), []).append(hit)
    expected[f'aro/{task}/acc'] = sum(map(sum, groups.values())) / len(data)
    kept = [sum(h) / len(h) for g, h in groups.items() if keep(g, len(h))]
    expected[f'aro/{task}/macro_acc'] = sum(kept) / len(kept)
  for task in ('coco_order', 'flickr30k_order'):
    data = json.loads((aro_root / aro.TASKS[task]).read_text())
    hits = []
    for path, options in zip(ev.tasks[task]['paths'], ev.tasks[task]['texts']):
      s = [cos(towers, order_colors[os.path.relpath(path, aro_root)], o) for o in options]
      hits.append(s[0] >= max(s[1:]))
    assert len(hits) == sum(len(d['caption']) for d in data)
    expected[f'aro/{task}/acc'] = sum(hits) / len(hits)
  assert metrics.keys() == expected.keys()
  for k, v in expected.items():
    assert metrics[k] == pytest.approx(v, abs=1e-12), k
  assert_informative(expected.values())


def test_order_perturbations_shuffle_trigrams_and_within_them():
  caption = ' '.join(f'w{i}' for i in range(8))
  blocks = [['w0', 'w1', 'w2'], ['w3', 'w4', 'w5'], ['w6', 'w7']]
  seen_within, seen_blocks = set(), set()
  for seed in range(20):
    within = aro.shuffle_within_trigrams(caption, np.random.default_rng(seed)).split()
    assert [sorted(within[i:i + 3]) for i in (0, 3, 6)] == [sorted(b) for b in blocks]
    seen_within.add(tuple(within))
    out = aro.shuffle_trigrams(caption, np.random.default_rng(seed)).split()
    orders = [o for o in itertools.permutations(range(3))
              if out == [w for i in o for w in blocks[i]]]
    assert len(orders) == 1  # The three blocks, whole, in some order.
    seen_blocks.add(orders[0])
  assert len(seen_within) > 5 and len(seen_blocks) > 3  # Random, not fixed orders.
  assert aro.pre_caption('A Dog (left): runs; on "the" beach!!', max_words=4) == 'a dog left runs'


def test_aro_order_options_are_the_caption_and_its_perturbations(predictor, aro_root):
  root, _ = aro_root
  ev = aro.AroEvaluator(predictor, root=str(root), tasks=['coco_order'], **KW)
  data = json.loads((root / 'coco_karpathy_test.json').read_text())
  captions = [c for d in data for c in d['caption']]
  options = ev.tasks['coco_order']['texts']
  assert len(options) == len(captions) and options[0][0] == 'a dog, number 0, runs on the beach'
  for caption, opts in zip(captions, options):
    assert len(opts) == 3 and opts[0] == aro.pre_caption(caption)
    # Each perturbation reorders the caption's words and punctuation (ARO tokenizes first).
    words = sorted(aro.pre_caption(' '.join(re.findall(r"\w+|[^\w\s]", caption))).split())
    assert sorted(opts[1].split()) == words and sorted(opts[2].split()) == words
  assert any(o[1] != o[0].replace(',', ' ,') for o in options)
  again = aro.AroEvaluator(predictor, root=str(root), tasks=['coco_order'], **KW)
  assert again.tasks['coco_order']['texts'] == options  # Seeded: the same every run.
  other = aro.AroEvaluator(predictor, root=str(root), tasks=['coco_order'], seed=1, **KW)
  assert other.tasks['coco_order']['texts'] != options


def test_aro_bad_input(predictor, aro_root, tmp_path):
  aro_root, _ = aro_root
  with pytest.raises(ValueError, match=r"\['vg_relations'\].*valid:.*'vg_relation'"):
    aro.AroEvaluator(predictor, root=str(aro_root), tasks=['vg_relations'], **KW)
  with pytest.raises(ValueError, match='shuffle_nouns_and_adj.*POS tagger.*valid'):
    aro.AroEvaluator(predictor, root=str(aro_root), tasks=['coco_order'],
                     perturbations=['shuffle_nouns_and_adj'], **KW)
  with pytest.raises(FileNotFoundError, match='visual_genome_relation.json not found'):
    aro.AroEvaluator(predictor, root=str(tmp_path), tasks=['vg_relation'], **KW)
  (tmp_path / 'visual_genome_relation.json').write_text(json.dumps([{'image_path': 'a.jpg'}]))
  with pytest.raises(ValueError, match=r"entry 0 lacks \['bbox_x'"):
    aro.AroEvaluator(predictor, root=str(tmp_path), tasks=['vg_relation'], **KW)


# --- Winoground ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def winoground_root(tmp_path_factory):
  root = tmp_path_factory.mktemp('winoground')
  lines = []
  for i in range(8):
    for k in (0, 1):
      write_image(root / 'images' / f'ex_{i}_img_{k}.png', (2 * i + k) % 27, size=(16, 12))
    lines.append(dict(id=i, image_0=f'ex_{i}_img_0', image_1=f'ex_{i}_img_1',
                      caption_0=f'a mug in some grass {i}', caption_1=f'some grass in a mug {i}',
                      tag='Noun', secondary_tag='', num_main_preds=1,
                      collapsed_tag=('Object', 'Relation', 'Both')[i % 3]))
  (root / 'examples.jsonl').write_text('\n'.join(map(json.dumps, lines)) + '\n')
  return root, lines


def test_winoground_matches_brute_force(predictor, towers, winoground_root):
  root, lines = winoground_root
  metrics = winoground.WinogroundEvaluator(predictor, root=str(root), **KW).run({})
  per = []
  for i, ex in enumerate(lines):
    s = {(c, k): cos(towers, (2 * i + k) % 27, ex[f'caption_{c}']) for c in (0, 1)
         for k in (0, 1)}
    text = s[0, 0] > s[1, 0] and s[1, 1] > s[0, 1]
    image = s[0, 0] > s[0, 1] and s[1, 1] > s[1, 0]
    per.append((ex['collapsed_tag'], dict(text=text, image=image, group=text and image)))
  expected = {}
  for tag in (None, 'Both', 'Object', 'Relation'):
    rows = [h for t, h in per if tag in (None, t)]
    for k in ('text', 'image', 'group'):
      expected['winoground/' + (f'{tag}/' if tag else '') + k] = (
          sum(r[k] for r in rows) / len(rows))
  assert metrics.keys() == expected.keys()
  for k, v in expected.items():
    assert metrics[k] == pytest.approx(v, abs=1e-12), k
  assert_informative(expected.values())


def test_winoground_bad_input(predictor, tmp_path):
  (tmp_path / 'examples.jsonl').write_text(json.dumps({'id': 0, 'caption_0': 'a'}) + '\n')
  with pytest.raises(ValueError, match=r"on line 1 lacks \['image_0', 'image_1', 'caption_1'\]"):
    winoground.WinogroundEvaluator(predictor, root=str(tmp_path), **KW)


# --- Shared pieces ------------------------------------------------------------------------


@pytest.mark.parametrize('n', [1, 3, 8, 13])
@pytest.mark.parametrize('count', [1, 2, 3, 8])
def test_process_shares_are_equal_padded_and_in_order(n, count):
  shares = [local_files.process_share(n, count, p) for p in range(count)]
  assert len({len(s) for s in shares}) == 1 and all(len(s) > 0 for s in shares)
  assert np.concatenate(shares)[:n].tolist() == list(range(n))
  assert np.concatenate(shares).max() == n - 1


def test_suite_builds_through_build_evaluators(predictor, sugarcrepe_root, aro_root,
                                               winoground_root, tmp_path):
  for name, (src, _) in (('sugarcrepe', sugarcrepe_root), ('winoground', winoground_root)):
    (tmp_path / name).symlink_to(src)
  (tmp_path / 'aro').symlink_to(aro_root[0])
  c = demo.get_config('tiny')
  c.evals = evals.compositionality_suite(str(tmp_path), pp_img=PP, batch_size=4)
  built = evaluate.build_evaluators(c, predictor)
  assert {k: type(v[0]) for k, v in built.items()} == {
      'sugarcrepe': sugarcrepe.SugarCrepeEvaluator, 'aro': aro.AroEvaluator,
      'winoground': winoground.WinogroundEvaluator}
  assert built['aro'][0].text_len == c.text_len and set(built['aro'][0].tasks) == set(aro.TASKS)
  with pytest.raises(ValueError, match=r"\['crepe'\].*valid"):
    evals.compositionality_suite(str(tmp_path), tasks=['crepe'])


_WORKER = '''
import json, sys
import jax
jax.config.update('jax_cpu_collectives_implementation', 'gloo')
jax.distributed.initialize(sys.argv[1], num_processes=2, process_id=int(sys.argv[2]))
from local_bench_fixtures import PP, Towers
from mmcl.data import tokenizers
from mmcl.evaluate import predict, sugarcrepe, winoground
from mmcl.parallel import mesh as mesh_lib
towers = Towers(tokenizers.get_tokenizer('bytes').vocab_size, {text_len})
pred = predict.Predictor(towers.model, mesh_lib.create_mesh([('data', -1)]))
kw = dict(pp_img={pp!r}, tokenizer='bytes', text_len={text_len}, batch_size=4)
m = sugarcrepe.SugarCrepeEvaluator(pred, root=sys.argv[3], categories=['add_att'], **kw).run({{}})
m.update(winoground.WinogroundEvaluator(pred, root=sys.argv[4], **kw).run({{}}))
print('METRICS', json.dumps(m))
'''


@pytest.mark.slow  # Two fresh interpreters importing JAX and TF: ~20 s of CPU.
def test_two_processes_match_one(predictor, winoground_root, tmp_path):
  """Shares padded per process: one SugarCrepe image for two processes, 16 Winoground ones."""
  write_image(tmp_path / 'val2017' / 'one.jpg', 5)
  (tmp_path / 'add_att.json').write_text(json.dumps(
      {'7': dict(filename='one.jpg', caption='a cat', negative_caption='a hat')}))
  root, _ = winoground_root
  want = sugarcrepe.SugarCrepeEvaluator(predictor, root=str(tmp_path), categories=['add_att'],
                                        **KW).run({})
  want.update(winoground.WinogroundEvaluator(predictor, root=str(root), **KW).run({}))
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
             JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(
                 [os.path.dirname(tests_dir), tests_dir, os.environ.get('PYTHONPATH', '')]))
  code = _WORKER.format(text_len=TEXT_LEN, pp=PP)
  procs = [subprocess.Popen([sys.executable, '-c', code, f'127.0.0.1:{port}', str(i),
                             str(tmp_path), str(root)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for i in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (out, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
    got = json.loads(out.split('METRICS ', 1)[1])
    assert got.keys() == want.keys()
    for k, v in want.items():
      assert got[k] == pytest.approx(v, abs=1e-12), k
