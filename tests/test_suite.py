"""The zero-shot suite (mmcl/evaluate/suite.py): its shipped names and templates against TFDS
metadata, mean per-class recall, derived labels and the suite mean against numpy, and
`tools/eval.py --evals=suite` on a tiny demo checkpoint over `tfds.testing.mock_data`.

Mocked examples are flat-coloured images whose colour spells an id (test_zeroshot_datasets),
so stub towers give each image and class-name text an embedding the test chose.
"""
import contextlib
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import demo, evals
from mmcl import checkpoint
from mmcl.evaluate import predict, prompts, suite, zeroshot
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import loop
from test_evaluate import StubModel
from test_zeroshot_datasets import PP, TEXT_LEN, coloured_image, image_tower, text_tower

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DERIVED = {'clevr_count_all': 8, 'clevr_closest_object_distance': 6,
           'kitti_closest_vehicle_distance': 4}  # Classes of each derived label.


def _objects(name, rng):
  """CLEVR / KITTI `objects` features (their TFDS names and dtypes)."""
  n = int(rng.integers(3, 11)) if name == 'clevr' else int(rng.integers(0, 4))
  if name == 'clevr':
    return {'size': rng.integers(0, 2, n), 'pixel_coords': np.stack(
        [rng.uniform(0, 480, n), rng.uniform(0, 320, n), rng.uniform(7, 12, n)], 1
    ).astype(np.float32)}
  return {'type': rng.integers(0, 8, n), 'location': rng.uniform(
      0, 40, (n, 3)).astype(np.float32)}


def suite_examples(names, per_dataset=4, seed=0):
  """{TFDS builder name: [examples]}; image ids are distinct over all of them."""
  rng, out, i = np.random.default_rng(seed), {}, 0
  for name in names:
    e = suite.SUITE[name]
    builder = e['dataset'].split('/')[0]
    num = len(prompts.classnames(e['classnames'], None, 'label'))
    subset = prompts.class_subset(e.get('class_subset'))
    for _ in range(per_dataset):
      ex = {'image': coloured_image(i, rng)}
      if builder in ('clevr', 'kitti'):
        ex['objects'] = _objects(builder, rng)
      else:
        ex[e['label_key']] = int(rng.choice(subset) if subset else rng.integers(num))
      out.setdefault(builder, []).append(ex)
      i += 1
  return out


@contextlib.contextmanager
def mock_suite(examples, seen=None):
  """mock_data serving examples[builder.name] for any split."""
  def spec(v):
    if isinstance(v, dict):
      return {k: spec(x) for k, x in v.items()}
    v = np.asarray(v)
    return tf.TensorSpec([None] * v.ndim, tf.as_dtype(v.dtype))

  def as_dataset(self, split, *args, **kwargs):
    del args, kwargs
    if seen is not None:
      seen.append((self.name, str(split)))
    rows = examples[self.name]
    return tf.data.Dataset.from_generator(lambda: iter(rows), output_signature=spec(rows[0]))

  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    yield


def test_entries_names_templates_and_tfds_label_counts(tmp_path):
  """Every entry's files load; class counts match TFDS's metadata (no download needed)."""
  assert len(suite.DATACOMP) == 23 and set(suite.DATACOMP) < set(suite.SUITE)
  for name, e in suite.SUITE.items():
    names = prompts.classnames(e['classnames'], None, e['label_key'])
    templates = prompts.templates(e['prompts'])
    assert templates and e['metric'] in zeroshot.METRICS, name
    assert tfds.builder(e['dataset'], data_dir=str(tmp_path)) is not None
    features = tfds.builder(e['dataset'], data_dir=str(tmp_path)).info.features
    if name in DERIVED:
      assert len(names) == DERIVED[name], name
      continue
    label = features[e['label_key']]
    label = getattr(label, 'feature', label)
    assert len(names) == label.num_classes, name
    if name in ('dtd', 'cars196'):  # Names taken verbatim from TFDS.
      assert names == tuple(label.names)
  assert {n for n, e in suite.SUITE.items() if e['metric'] == 'mean_per_class_recall'} == {
      'caltech101', 'oxford_flowers102', 'oxford_iiit_pet'}
  assert prompts.classnames('clevr_distance', None, 'label')[3] == ''  # Kept, as published.
  assert prompts.classnames('sun397', None, 'label')[:2] == ('abbey', 'airplane cabin')
  assert prompts.templates('clip_food101') == ('a photo of {}, a type of food.',)
  with pytest.raises(ValueError, match=r"Unknown zero-shot suite datasets \['gtsrb'\]; valid"):
    suite.entries(['cifar10', 'gtsrb'])


def test_docs_table_matches_the_suite():
  """docs/evaluation.md's suite table lists every entry with its dataset, split, classes and
  metric as the code has them."""
  with open(os.path.join(ROOT, 'docs', 'evaluation.md')) as f:
    doc = f.read().split('## The zero-shot suite')[1].split('\n## ')[0]
  rows = {}
  for line in doc.splitlines():
    cells = [c.strip().strip('`') for c in line.strip('|').split('|')]
    if len(cells) == 8 and cells[0] in suite.SUITE:
      rows[cells[0]] = cells
  assert set(rows) == set(suite.SUITE)
  for name, (_, dataset, split, _, classes, _, templates, metric) in rows.items():
    e = suite.SUITE[name]
    assert (dataset, split) == (e['dataset'], e['split']), name
    assert int(classes) == len(prompts.classnames(e['classnames'], None, e['label_key'])), name
    assert templates.startswith(f"{e['prompts']}` ({len(prompts.templates(e['prompts']))})")
    assert metric == {'top1': 'top-1', 'mean_per_class_recall': 'mean per-class recall'}[
        e['metric']], name


def _labels_numpy(name, rows):
  """The labels, VTAB's derived ones written out with explicit thresholds."""
  def one(ex):
    o = ex.get('objects')
    if name == 'clevr_count_all':
      return len(o['size']) - 3
    if name == 'clevr_closest_object_distance':
      return sum(o['pixel_coords'][:, 2].min() > t for t in (8.0, 8.5, 9.0, 9.5, 10.0))
    if name == 'kitti_closest_vehicle_distance':
      d = min([loc[2] for t, loc in zip(o['type'], o['location']) if t < 3], default=1000.0)
      return 0 if d <= 8 else 1 if d <= 20 else 2 if d <= 999 else 3
    return ex['label']
  return np.array([one(ex) for ex in rows])


def test_metrics_and_suite_mean_against_numpy():
  """Top-1, mean per-class recall (imbalanced classes), derived labels and the mean."""
  names = ['oxford_flowers102', 'clevr_count_all', 'clevr_closest_object_distance',
           'kitti_closest_vehicle_distance']
  rng = np.random.default_rng(3)
  examples = suite_examples(names, per_dataset=24, seed=3)
  # Flowers: 24 images over 3 classes, 16 / 6 / 2 of them.
  for ex, label in zip(examples['oxford_flowers102'], [5] * 16 + [9] * 6 + [40] * 2):
    ex['label'] = label
  texts, offsets, rows = [], {}, 0
  for n in names:
    cls = prompts.classnames(suite.SUITE[n]['classnames'], None, 'label')
    offsets[n] = (rows, len(cls))
    texts += list(cls)
    rows += len(cls)
  text_targets = rng.normal(size=(rows, 16))
  first = {'oxford_flowers102': 0, 'clevr': 24, 'kitti': 72}  # Image ids of each builder.
  labels = {n: _labels_numpy(n, examples[suite.SUITE[n]['dataset']]) for n in names}
  image_targets = rng.normal(size=(96, 16))
  # Right for flowers' rows 0-7 (class 5) and 16-21 (all of class 9), CLEVR's even scenes
  # (count task) and KITTI's even images; random (so mostly wrong) elsewhere.
  for n, right in (('oxford_flowers102', list(range(8)) + list(range(16, 22))),
                   ('clevr_count_all', range(0, 48, 2)),
                   ('kitti_closest_vehicle_distance', range(0, 24, 2))):
    i0, s0 = first[suite.SUITE[n]['dataset']], offsets[n][0]
    for r in right:
      image_targets[i0 + r] = text_targets[s0 + labels[n][r]]
  model = StubModel(image_fn=image_tower(image_targets), text_fn=text_tower(texts, text_targets))
  mesh = mesh_lib.create_mesh([('data', -1)])
  seen = []
  with mock_suite(examples, seen):
    ev = zeroshot.ZeroShotEvaluator(
        predict.Predictor(model, mesh), tokenizer='bytes', text_len=TEXT_LEN, pp_img=PP,
        datasets=suite.entries(names, prompts='classname'), batch_size=16, summary='suite')
    m = ev.run({})
  assert seen == [('oxford_flowers102', 'test'), ('clevr', 'validation'),
                  ('clevr', 'validation'), ('kitti', 'test')]
  main = []
  for n in names:
    builder = suite.SUITE[n]['dataset']
    zimg = image_targets[first[builder]:first[builder] + len(examples[builder])]
    s, c = offsets[n]
    clf = text_targets[s:s + c] / np.linalg.norm(text_targets[s:s + c], axis=1, keepdims=True)
    pred, lab = np.argmax(zimg @ clf.T, axis=1), labels[n]
    top1 = np.mean(pred == lab)
    assert 0 < top1 < 1 and m[f'zeroshot/{n}/top1'] == pytest.approx(top1), n
    if n == 'oxford_flowers102':
      recall = np.mean([np.mean(pred[lab == k] == k) for k in np.unique(lab)])
      assert m[f'zeroshot/{n}/mean_per_class_recall'] == pytest.approx(recall)
      assert recall == pytest.approx((0.5 + 1 + 0) / 3) and top1 == pytest.approx(14 / 24)
      main.append(recall)
    else:
      main.append(top1)
  assert m['zeroshot/suite/mean'] == pytest.approx(np.mean(main))
  assert 'zeroshot/clevr_count_all/mean_per_class_recall' not in m
  with mock_suite(examples), pytest.raises(ValueError, match="metric 'recall' is not one of"):
    zeroshot.ZeroShotEvaluator(
        predict.Predictor(model, mesh), tokenizer='bytes', text_len=TEXT_LEN, pp_img=PP,
        datasets=[dict(suite.entries(['oxford_flowers102'])[0], metric='recall')])


@pytest.fixture(scope='module')
def demo_workdir(tmp_path_factory):
  """The tiny demo's initial parameters saved as its step-1 checkpoint (train-free)."""
  s = loop.setup(demo.get_config('tiny'))
  w = str(tmp_path_factory.mktemp('suite_demo'))
  ckpt = checkpoint.Checkpointer(w)
  ckpt.save(1, s.init_state(jax.random.key(0)), force=True)
  ckpt.close()
  return w


# The CLI, in a subprocess that mocks TFDS and makes 'suite' cheap (bare class names).
_CLI = """
import functools, sys
sys.path[:0] = [{root!r}, {tests!r}]
from absl import app
from configs import evals
import runpy, test_suite
evals.NAMED_SUITES['suite'] = functools.partial(evals.zeroshot_suite, prompts='classname',
                                                batch_size=16)
tool = runpy.run_path({tool!r}, run_name='eval_tool')
with test_suite.mock_suite(test_suite.suite_examples(list(test_suite.suite.DATACOMP))):
  app.run(tool['main'], argv=['eval.py'] + sys.argv[1:])
"""


def test_cli_evals_suite_prints_every_dataset_and_the_mean(demo_workdir, tmp_path):
  code = _CLI.format(root=ROOT, tests=os.path.join(ROOT, 'tests'),
                     tool=os.path.join(ROOT, 'tools', 'eval.py'))
  p = subprocess.run(
      [sys.executable, '-c', code, f'--config={ROOT}/configs/demo.py:tiny',
       f'--workdir={demo_workdir}', '--evals=suite', f'--out_dir={tmp_path}'],
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=600)
  assert p.returncode == 0, p.stderr[-3000:]
  assert 'Evaluation at step 1' in p.stdout
  groups, head = {}, None  # format_table: a `kind/dataset` line, then `  name  value` lines.
  for line in p.stdout.splitlines()[1:]:
    if line.startswith('  '):
      groups[head][line.split()[0]] = float(line.split()[1])
    else:
      head = line
      groups[head] = {}
  want = {f'zeroshot/{n}': {'top1', 'top5'} | ({e['metric']} - {'top1'})
          for n, e in suite.DATACOMP.items()}
  assert {k: set(v) for k, v in groups.items()} == {**want, 'zeroshot/suite': {'mean'}}
  main = [groups[f'zeroshot/{n}'][e['metric']] for n, e in suite.DATACOMP.items()]
  assert groups['zeroshot/suite']['mean'] == pytest.approx(np.mean(main), abs=1e-4)


def test_with_named_suites():
  c = demo.get_config('tiny')
  config, only = evals.with_named_suites(c, ['suite', 'probe'])
  assert only == ['zeroshot_suite', 'probe'] and 'zeroshot_suite' not in c.evals
  assert config.evals.zeroshot_suite.summary == 'suite'
  assert len(config.evals.zeroshot_suite.datasets) == len(suite.DATACOMP)
  assert evals.with_named_suites(c, None) == (c, None)
  _, only = evals.with_named_suites(c, ['nope'])
  assert only == ['nope']  # Left for checkpoint_eval to report with the valid names.
