"""Embedding geometry: each metric against a direct float64 computation, plus the evaluator."""
import itertools

import numpy as np
import pytest

from mmcl.evaluate import geometry, predict
from mmcl.parallel import mesh as mesh_lib
from test_evaluate import DATASET, PP_IMG, TEXT_LEN, StubModel, image_lookup, text_lookup
from test_evaluate import test_split  # noqa: F401  (fixture)


def unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def random_pairs(seed, n=17, d=5, shift=0.0):
  rng = np.random.default_rng(seed)
  x = unit(rng.normal(size=(n, d)) + shift)
  y = unit(x + rng.normal(size=(n, d)))
  return x, y


def ref_uniformity(x):
  vals = [np.exp(-2 * np.sum((x[i] - x[j]) ** 2))
          for i, j in itertools.permutations(range(len(x)), 2)]
  return np.log(np.mean(vals))


def ref_auc(x, y):
  n = len(x)
  pos = [x[i] @ y[i] for i in range(n)]
  neg = [x[i] @ y[j] for i in range(n) for j in range(n) if i != j]
  wins = sum((p > q) + 0.5 * (p == q) for p in pos for q in neg)
  return wins / (len(pos) * len(neg))


def ref_erank(x):
  s = np.linalg.svd(x, compute_uv=False)
  p = s[s > 1e-9] / s.sum()
  return np.exp(-np.sum(p * np.log(p)))


@pytest.mark.parametrize('seed', [0, 1])
@pytest.mark.parametrize('chunk', [1, 4, 2048])
def test_metrics_match_direct_computation(seed, chunk):
  x, y = random_pairs(seed, shift=0.5 * seed)
  n = len(x)
  gap = np.linalg.norm(sum(x) / n - sum(y) / n)
  assert geometry.modality_gap(x, y) == pytest.approx(gap, rel=1e-12)
  align = sum(np.sum((x[i] - y[i]) ** 2) for i in range(n)) / n
  assert geometry.alignment(x, y) == pytest.approx(align, rel=1e-12)
  assert geometry.uniformity(x, chunk) == pytest.approx(ref_uniformity(x), rel=1e-9)
  assert geometry.pair_auc(x, y, chunk) == pytest.approx(ref_auc(x, y), rel=1e-12)
  assert geometry.effective_rank(x) == pytest.approx(ref_erank(x), rel=1e-6)
  assert geometry.effective_rank(x[:3]) == pytest.approx(ref_erank(x[:3]), rel=1e-6)  # N < D.
  assert 0 < geometry.pair_auc(x, y) < 1


def test_auc_counts_ties_as_half():
  # Multiples of 1/4: many exact ties between positive and negative similarities.
  rng = np.random.default_rng(3)
  x = rng.integers(-2, 3, size=(12, 3)) / 4
  y = rng.integers(-2, 3, size=(12, 3)) / 4
  sims = x @ y.T
  assert np.isin(np.diag(sims), sims[~np.eye(12, dtype=bool)]).any()
  assert geometry.pair_auc(x, y, chunk=5) == pytest.approx(ref_auc(x, y), rel=1e-12)


def test_extreme_geometries():
  d = 6
  eye = np.eye(d)
  m = geometry.geometry_metrics(eye, eye, 'g')
  assert m['g/modality_gap'] == pytest.approx(0, abs=1e-12)
  assert m['g/alignment'] == pytest.approx(0, abs=1e-12)
  assert m['g/auc'] == 1.0
  assert m['g/pos_cos'] == pytest.approx(1) and m['g/neg_cos'] == pytest.approx(0, abs=1e-12)
  assert m['g/erank_img'] == pytest.approx(d)  # Orthonormal rows: all directions used.
  assert m['g/uniformity_img'] == pytest.approx(-4)  # Every pair at squared distance 2.
  collapsed = np.ones((5, d)) + np.arange(5)[:, None] * 0  # Rank 1.
  assert geometry.effective_rank(collapsed) == pytest.approx(1)
  # Texts all shifted to one side: a large gap, and the sign of the cosines follows.
  shifted = geometry.geometry_metrics(eye, -eye, 'g')
  assert shifted['g/modality_gap'] == pytest.approx(2 / np.sqrt(d))
  assert shifted['g/auc'] == 0.0


def test_geometry_metrics_normalise_and_name():
  x, y = random_pairs(4)
  m = geometry.geometry_metrics(3 * x, 0.5 * y, 'geometry/foo')
  assert set(m) == {f'geometry/foo/{k}' for k in (
      'modality_gap', 'alignment', 'uniformity_img', 'uniformity_txt', 'auc', 'pos_cos',
      'neg_cos', 'erank_img', 'erank_txt')}
  assert m['geometry/foo/modality_gap'] == pytest.approx(geometry.modality_gap(x, y))
  neg = np.mean([x[i] @ y[j] for i in range(len(x)) for j in range(len(x)) if i != j])
  assert m['geometry/foo/neg_cos'] == pytest.approx(neg)
  with pytest.raises(ValueError, match='at least 2 pairs'):
    geometry.geometry_metrics(x[:1], y[:1], 'g')


def test_geometry_evaluator_pairs_images_with_first_caption(shapes_data_dir, test_split):
  """End to end: images and captions embed to known random rows; metrics match them."""
  from mmcl.data import tokenizers
  rng = np.random.default_rng(0)
  n = len(test_split['image'])
  zimg = rng.normal(size=(n, 8))
  tok = tokenizers.get_tokenizer('bytes')
  firsts = [c[0] for c in test_split['captions']]
  uniq = sorted(set(firsts))
  ztab = rng.normal(size=(len(uniq), 8))
  model = StubModel(image_fn=image_lookup(test_split['image'], zimg),
                    text_fn=text_lookup(tok.tokenize(uniq, TEXT_LEN), ztab))
  mesh = mesh_lib.create_mesh([('data', -1)])
  ev = geometry.GeometryEvaluator(predict.Predictor(model, mesh), dataset=DATASET,
                                  pp_img=PP_IMG, tokenizer='bytes', text_len=TEXT_LEN,
                                  data_dir=shapes_data_dir, batch_size=48)
  got = ev.run({})
  want = geometry.geometry_metrics(zimg, ztab[[uniq.index(f) for f in firsts]],
                                   'geometry/mmcl_shapes')
  assert set(got) == set(want)
  for k, v in want.items():
    assert got[k] == pytest.approx(v, rel=1e-5, abs=1e-6), k
