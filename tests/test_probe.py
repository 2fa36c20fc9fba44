"""Few-shot ridge probes: the closed form against normal equations, shot sampling, the
penalty choice, and the evaluator on the synthetic dataset (perfect and shuffled towers)."""
import numpy as np
import pytest

from mmcl import evaluate
from mmcl.data import shapes
from mmcl.evaluate import predict, probe
from mmcl.parallel import mesh as mesh_lib
from test_evaluate import DATASET, PP_IMG, StubModel, image_lookup
from test_evaluate import test_split  # noqa: F401  (fixture)


def ref_ridge(x, labels, c, l2):
  """Normal equations with an unpenalised intercept, via explicit centring (float64)."""
  y = np.eye(c)[labels]
  xc, yc = x - x.mean(0), y - y.mean(0)
  w = np.linalg.solve(xc.T @ xc + l2 * np.eye(x.shape[1]), xc.T @ yc)
  return w, y.mean(0) - x.mean(0) @ w


@pytest.mark.parametrize('n, d', [(40, 6), (7, 12)])  # Over- and under-determined.
def test_ridge_fits_match_normal_equations(n, d):
  rng = np.random.default_rng(n)
  x = rng.normal(size=(n, d))
  labels = rng.integers(0, 4, size=n)
  regs = (1e-3, 0.5, 8.0)
  for (w, b), l2 in zip(probe.ridge_fits(x, labels, 4, regs), regs):
    rw, rb = ref_ridge(x, labels, 4, l2)
    np.testing.assert_allclose(w, rw, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(b, rb, rtol=1e-8, atol=1e-10)
  # Accuracy: argmax of the scores, counted directly.
  xt = rng.normal(size=(30, d))
  lt = rng.integers(0, 4, size=30)
  fit = probe.ridge_fits(x, labels, 4, [0.5])[0]
  scores = xt @ fit[0] + fit[1]
  want = sum(int(np.argmax(scores[i]) == lt[i]) for i in range(30)) / 30
  assert probe.ridge_accuracy(fit, xt, lt) == want


def test_sample_shots_per_class_and_disjoint():
  labels = np.repeat(np.arange(5), [3, 8, 8, 2, 9])
  train, held = probe.sample_shots(labels, 2, 3, np.random.default_rng(0))
  assert not set(train) & set(held)
  np.testing.assert_array_equal(np.bincount(labels[train], minlength=5), [2, 2, 2, 2, 2])
  np.testing.assert_array_equal(np.bincount(labels[held], minlength=5), [1, 3, 3, 0, 3])
  again, _ = probe.sample_shots(labels, 2, 3, np.random.default_rng(0))
  np.testing.assert_array_equal(train, again)  # Seeded.


def test_fewshot_picks_penalty_on_held_out_data():
  rng = np.random.default_rng(1)
  c, d = 3, 10
  means = rng.normal(size=(c, d))
  labels = rng.integers(0, c, size=200)
  x = means[labels] + 2.0 * rng.normal(size=(200, d))
  test = (x[150:], labels[150:])
  train = (x[:150], labels[:150])
  regs = (1e-4, 1.0, 1e4)
  acc, l2 = probe.fewshot_accuracy(train, test, c, 5, seed=7, l2_regs=regs, val_per_class=10)
  # The same draw and choice, done by hand.
  idx, held = probe.sample_shots(train[1], 5, 10, np.random.default_rng(7))
  val_accs = [probe.ridge_accuracy(ref_ridge(train[0][idx], train[1][idx], c, r),
                                   train[0][held], train[1][held]) for r in regs]
  best = regs[int(np.argmax(val_accs))]
  assert l2 == best
  assert acc == probe.ridge_accuracy(ref_ridge(train[0][idx], train[1][idx], c, best), *test)
  with pytest.raises(ValueError, match='No held-out images'):
    probe.fewshot_accuracy(train, test, c, 5, 0, regs, val_per_class=0)


def _probe(model, data_dir, **kw):
  mesh = mesh_lib.create_mesh([('data', -1)])
  kw = dict(dict(dataset=DATASET, pp_img=PP_IMG, label_key='shape', train_split='test',
                 test_split='test', shots=(1, 5), seeds=2, data_dir=data_dir, batch_size=64),
            **kw)
  return probe.ProbeEvaluator(predict.Predictor(model, mesh), **kw)


def test_probe_perfect_and_shuffled_towers(shapes_data_dir, test_split):  # noqa: F811
  """Image embeddings = one-hot(shape): 1.0 at 1 shot; one-hot of shuffled shapes: chance."""
  num = len(shapes.SHAPES)
  onehot = np.eye(num)[test_split['shape']]
  ev = _probe(StubModel(image_fn=image_lookup(test_split['image'], onehot)), shapes_data_dir)
  m = ev.run({})
  assert set(m) == {f'probe/mmcl_shapes/{k}shot/top1{s}' for k in (1, 5) for s in ('', '_std')}
  assert m['probe/mmcl_shapes/1shot/top1'] == 1.0
  assert m['probe/mmcl_shapes/5shot/top1'] == 1.0
  assert m['probe/mmcl_shapes/1shot/top1_std'] == 0.0
  shuffled = onehot[np.random.default_rng(0).permutation(len(onehot))]
  ev = _probe(StubModel(image_fn=image_lookup(test_split['image'], shuffled)), shapes_data_dir)
  m = ev.run({})
  for k in (1, 5):
    assert m[f'probe/mmcl_shapes/{k}shot/top1'] < 0.35, m  # Chance is 1/8.


def test_probe_from_config_and_errors(shapes_data_dir):
  from configs import demo
  c = demo.get_config('tiny')
  c.data_dir = shapes_data_dir
  evs = evaluate.build_evaluators(c, predict.Predictor(StubModel(), mesh_lib.create_mesh(
      [('data', -1)])))
  ev, every = evs['probe']
  assert isinstance(ev, probe.ProbeEvaluator) and every == 0
  assert ev.shots == (1, 5, 10) and ev.num_classes == len(shapes.SHAPES)
  with pytest.raises(ValueError, match="no ClassLabel feature 'captions'"):
    _probe(StubModel(), shapes_data_dir, label_key='captions')
  with pytest.raises(ValueError, match='shots >= 1'):
    _probe(StubModel(), shapes_data_dir, shots=(0,))
