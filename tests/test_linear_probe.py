"""The CLIP-paper linear probe (mmcl/evaluate/linear_probe.py): the L-BFGS fit against an
independent Newton solve, the C search against the full grid, and the evaluator on mock data."""
import numpy as np
import pytest

from mmcl import evaluate
from mmcl.evaluate import linear_probe, predict
from mmcl.parallel import mesh as mesh_lib
from test_evaluate import StubModel
from test_suite import mock_suite
from test_zeroshot_datasets import PP, coloured_image, image_tower


def newton_fit(x, labels, num_classes, c, steps=30):
  """The same objective minimised by Newton's method on (W, b) jointly, float64."""
  n, d = x.shape
  xa = np.concatenate([x, np.ones((n, 1))], axis=1)  # The last row of theta is b.
  y = np.eye(num_classes)[labels]
  reg = np.kron(np.diag(np.r_[np.ones(d), 0.0]), np.eye(num_classes)) / c  # b unpenalised.
  theta = np.zeros((d + 1, num_classes))
  for _ in range(steps):
    logits = xa @ theta
    p = np.exp(logits - logits.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    grad = (xa.T @ (p - y)).ravel() + reg @ theta.ravel()
    hess = sum(np.kron(np.outer(xa[i], xa[i]), np.diag(p[i]) - np.outer(p[i], p[i]))
               for i in range(n)) + reg
    # The softmax is invariant to a shift of all biases: pinv takes the minimum-norm step.
    theta = theta - (np.linalg.pinv(hess) @ grad).reshape(theta.shape)
  return theta[:-1], theta[-1]


@pytest.mark.parametrize('c', [0.05, 1.0, 20.0])
def test_logistic_fit_matches_newton(c):
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, size=40)
  x = rng.normal(size=(40, 4)) + np.eye(3, 4)[labels]  # Overlapping classes: finite optimum.
  w, b = linear_probe.logistic_fit(x, labels, 3, c)
  w_ref, b_ref = newton_fit(x, labels, 3, c)
  np.testing.assert_allclose(w, w_ref, atol=1e-4)
  # Only bias differences are identified (a common shift leaves the softmax unchanged).
  np.testing.assert_allclose(b - b.mean(), b_ref - b_ref.mean(), atol=1e-4)
  assert np.abs(w).max() > 0.05  # A real fit, not the zero start.


def test_search_c_finds_the_grid_best_of_a_peaked_score():
  for peak in (-5.3, -0.6, 1.375, 4.9):
    calls = []
    score = lambda c, p=peak: calls.append(c) or -abs(np.log10(c) - p)
    best, scores = linear_probe.search_c(score)
    grid = np.arange(-6, 6 + 1e-9, 1 / 8)  # CLIP's resolution: 8 steps a decade.
    assert np.log10(best) == pytest.approx(grid[np.argmax([-abs(e - peak) for e in grid])])
    assert len(calls) == len(scores) <= 7 + 4 * 2  # Each C fitted once; far fewer than 97.


def _examples(num_classes, per_class, rng, offset=0):
  labels = np.repeat(np.arange(num_classes), per_class)
  return [{'image': coloured_image(offset + i, rng), 'label': int(l)}
          for i, l in enumerate(labels)], labels


def test_evaluator_on_mock_data():
  """Separable features: perfect test accuracy; the splits, metric names and C reported."""
  rng = np.random.default_rng(1)
  examples, labels = _examples(37, 4, rng)
  means = rng.normal(size=(37, 8)) * 3  # Well apart: a linear classifier separates them.
  targets = means[labels] + rng.normal(size=(len(labels), 8)) * 0.05
  model = StubModel(image_fn=image_tower(targets))
  mesh = mesh_lib.create_mesh([('data', -1)])
  seen = []
  with mock_suite({'oxford_iiit_pet': examples, 'eurosat': examples}, seen):
    ev = evaluate.LinearProbeEvaluator(predict.Predictor(model, mesh), pp_img=PP,
                                       dataset='oxford_iiit_pet', batch_size=64)
    m = ev.run({})
    from configs import demo, evals
    c = demo.get_config('tiny')
    c.evals = evals.linear_probe_suite(['oxford_iiit_pet'], batch_size=64)
    (built, every), = evaluate.build_evaluators(c, ev.predictor).values()
    assert isinstance(built, evaluate.LinearProbeEvaluator) and every == 0
    assert built.metric == 'mean_per_class_recall'
    with pytest.raises(ValueError, match=r"train_split 'train' holds the test split "
                       r"'train\[80%:\]'"):
      evaluate.LinearProbeEvaluator(predict.Predictor(model, mesh), dataset='eurosat/rgb',
                                    pp_img=PP)
  assert seen[:2] == [('oxford_iiit_pet', 'train'), ('oxford_iiit_pet', 'test')]
  assert set(m) == {f'probe/oxford_iiit_pet/linear/{k}'
                    for k in ('top1', 'mean_per_class_recall', 'C')}
  assert m['probe/oxford_iiit_pet/linear/top1'] == 1.0
  assert m['probe/oxford_iiit_pet/linear/mean_per_class_recall'] == 1.0
  assert 1e-6 <= m['probe/oxford_iiit_pet/linear/C'] <= 1e6
