"""NaFlex end to end (docs/resolution.md): the pp op, the ViT's patch-dict mode, zero-shot at
several budgets, and a tiny demo run. The blocks (mask, pooling, per-image position
embedding) are tested in test_resolution.py."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from mmcl.data import pp_naflex
from mmcl.data import preprocess
from mmcl.models import naflex
from mmcl.models import vit
from mmcl.parallel import mesh as mesh_lib

# Image sizes (H, W) of several aspect ratios, patch size, budget.
_CASES = [((64, 64), 8, 64), ((64, 64), 8, 32), ((100, 30), 16, 64), ((30, 100), 16, 64),
          ((480, 640), 16, 256), ((1, 500), 4, 10), ((33, 65), 8, 20), ((17, 23), 4, 7)]


def _brute_grid(hw, p, budget):
  """The grid of the largest scale s with ceil(H s/p) ceil(W s/p) <= budget, by a scan over
  s on a fine grid (exact fractions, no float ceil error)."""
  from fractions import Fraction
  best, (h, w) = None, hw
  for num in range(1, 4000):
    s = Fraction(num, 64)
    g = (max(1, math.ceil(h * s / p)), max(1, math.ceil(w * s / p)))
    if g[0] * g[1] <= budget:
      best = g
  return best


def _patchify(image, p, budget):
  fn = preprocess.get_preprocess_fn(f'patchify_naflex({p}, {budget})')
  return {k: v.numpy() for k, v in fn({'image': tf.constant(image)}).items()}


def test_keys_agree_with_the_model():
  assert pp_naflex.KEYS == naflex.KEYS


@pytest.mark.parametrize('hw,p,budget', _CASES)
def test_grid_is_the_largest_that_fits_and_keeps_the_aspect_ratio(hw, p, budget):
  h, w = pp_naflex.grid_for(tf.constant(hw), budget).numpy()
  assert (h, w) == _brute_grid(hw, p, budget)
  assert h * w <= budget
  # Aspect ratio within one patch: one scale s puts H s / p in (h - 1, h] and W s / p in
  # (w - 1, w] (a side of one patch may be any smaller size).
  lo = max((h - 1) * p / hw[0], (w - 1) * p / hw[1])
  hi = min(h * p / hw[0] if h > 1 else math.inf, w * p / hw[1] if w > 1 else math.inf)
  assert lo < hi


def test_patches_reassemble_to_the_resized_image_and_padding_is_masked():
  rng = np.random.default_rng(0)
  image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
  p, budget = 4, 40
  out = _patchify(image, p, budget)
  h, w = out['patch_grid']
  assert (h, w) == _brute_grid((37, 53), p, budget) and h * w <= budget
  assert out['image'].shape == (budget, p * p * 3) and out['image'].dtype == np.float32
  n = h * w
  np.testing.assert_array_equal(out['patch_mask'], np.arange(budget) < n)
  assert (out['patch_rows'][n:] == -1).all() and (out['patch_cols'][n:] == -1).all()
  assert (out['image'][n:] == 0).all()
  canvas = np.full((h * p, w * p, 3), np.nan, np.float32)
  for t in range(n):
    r, c = out['patch_rows'][t], out['patch_cols'][t]
    canvas[r * p:(r + 1) * p, c * p:(c + 1) * p] = out['image'][t].reshape(p, p, 3)
  want = tf.image.resize(image, (h * p, w * p), antialias=True).numpy()
  np.testing.assert_allclose(canvas, want, atol=1e-4)  # Every pixel placed once (no NaN).
  # Row-major token order, as the conv's output is flattened.
  np.testing.assert_array_equal(out['patch_rows'][:n] * w + out['patch_cols'][:n],
                                np.arange(n))


def test_drawn_budgets_vary_per_example_and_pad_to_the_budget():
  fn = preprocess.get_preprocess_fn('patchify_naflex(8, 64, draw=(4, 16, 64))')
  image = tf.zeros((64, 64, 3), tf.uint8)
  grids = set()
  for i in range(24):
    out = fn({'image': image, '_seed': tf.constant([i, 0], tf.int64)})
    assert out['image'].shape == (64, 192)
    h, w = out['patch_grid'].numpy()
    assert int(out['patch_mask'].numpy().sum()) == h * w
    grids.add((h, w))
  assert grids == {(2, 2), (4, 4), (8, 8)}  # Each drawn budget's largest square grid.
  again = fn({'image': image, '_seed': tf.constant([3, 0], tf.int64)})['patch_grid']
  assert tuple(again.numpy()) == tuple(fn({'image': image, '_seed': tf.constant(
      [3, 0], tf.int64)})['patch_grid'].numpy())  # Stateless: the seed decides.


def test_the_op_goes_before_a_trailing_keep_which_keeps_its_keys():
  keys = ', '.join(f'"{k}"' for k in naflex.KEYS)
  assert pp_naflex.with_patchify('decode|keep("image", "text")', 8, 16, (4, 16)) == (
      f'decode|patchify_naflex(8, 16, draw=(4, 16))|keep("image", "text", {keys})')
  assert pp_naflex.with_patchify('decode', 8, 16) == 'decode|patchify_naflex(8, 16)'


def test_bad_arguments_name_the_problem():
  with pytest.raises(ValueError, match='budget must be a positive int'):
    preprocess.get_preprocess_fn('patchify_naflex(8, 0)')
  with pytest.raises(ValueError, match='method must be one of'):
    preprocess.get_preprocess_fn('patchify_naflex(8, 16, method="cubic")')
  with pytest.raises(ValueError, match=r'draw must be .* \[1, budget=16\]'):
    preprocess.get_preprocess_fn('patchify_naflex(8, 16, draw=(4, 32))')


_VIT = dict(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, num_classes=8,
            posemb_grid=4)


def _init(model):
  """Parameters for 16 x 16 images (jitted: an eager init dispatches op by op, ~9 s)."""
  return jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 16, 16, 3))))()['params']


def _sharded(tree):
  mesh = mesh_lib.create_mesh((('data', -1),))
  return jax.device_put(tree, mesh_lib.batch_sharding(mesh))


@pytest.mark.parametrize('pool,cls', [('gap', False), ('map', True)])
def test_naflex_mode_equals_the_plain_vit_on_each_resized_image(pool, cls):
  """8 images of 3 aspect ratios, padded to one budget and sharded over 8 devices: each
  image's embedding equals the plain ViT (float64) on that image resized to its grid, with
  the same parameters; the square 16 x 16 image at grid 4 x 4 is the plain ViT unresized.
  MAP with a class token: the probe skips the padding, the class token is always valid."""
  rng = np.random.default_rng(0)
  sizes = [(16, 16), (12, 24), (30, 10), (16, 16)] * 2
  p, budget = 4, 20
  images = [rng.uniform(-1, 1, (*hw, 3)).astype(np.float32) for hw in sizes]
  items = [_patchify(im, p, budget) for im in images]
  batch = {k: np.stack([it[k] for it in items]) for k in items[0]}
  assert tuple(batch['patch_grid'][0]) == (4, 4)  # 16 tokens + 4 padding.
  model = vit.ViT(**_VIT, pool=pool, class_token=cls)
  params = _init(model)
  got = jax.jit(lambda prm, x: model.apply({'params': prm}, x)[0])(params, _sharded(batch))
  with jax.enable_x64(True):
    model64 = vit.ViT(**_VIT, pool=pool, class_token=cls, dtype='float64')
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    plain64 = jax.jit(lambda prm, x: model64.apply({'params': prm}, x)[0])
    for i, it in enumerate(items):
      h, w = it['patch_grid']
      resized = tf.image.resize(images[i], (h * p, w * p), antialias=True).numpy()
      if sizes[i] == (16, 16):
        np.testing.assert_array_equal(resized, images[i])
      want = plain64(p64, resized[None].astype(np.float64))[0]
      np.testing.assert_allclose(got[i], want, atol=2e-5)


def test_naflex_mode_refuses_what_it_cannot_do():
  batch = _patchify(np.zeros((16, 16, 3), np.float32), 4, 16)
  batch = {k: v[None] for k, v in batch.items()}
  model = vit.ViT(**_VIT)
  params = _init(model)
  with pytest.raises(ValueError, match='patch_size'):
    vit.ViT(**{**_VIT, 'patch_size': 2}).apply({'params': params}, batch)
  with pytest.raises(ValueError, match='lacks'):
    model.apply({'params': params}, {'image': batch['image']})
  with pytest.raises(ValueError, match='patch_dropout'):
    vit.ViT(**_VIT, patch_dropout=0.5).apply({'params': params}, batch, train=True,
                                             rngs={'dropout': jax.random.key(1)})


# ------------------------------------------------------------------ zero-shot and training


def _tiny_naflex(data_dir):
  from configs import demo  # pylint: disable=g-import-not-at-top
  c = demo.get_config('tiny,naflex')
  c.data_dir, c.progress_bar = data_dir, False
  return c


def test_zeroshot_at_each_budget_is_the_plain_model_on_the_resized_images(shapes_data_dir):
  """budget 64 = the 64 px image's full 8 x 8 grid, 16 = a 4 x 4 grid (the image at 32 px):
  top-1 equals a numpy argmax over the plain model's embeddings of the resized images; one
  compiled embedding function per budget."""
  from mmcl import models  # pylint: disable=g-import-not-at-top
  from mmcl.data import input_pipeline  # pylint: disable=g-import-not-at-top
  from mmcl.evaluate import predict, zeroshot  # pylint: disable=g-import-not-at-top
  c = _tiny_naflex(shapes_data_dir)
  mesh = mesh_lib.create_mesh((('data', -1),))
  model = models.get_model(c.model, mesh)
  params = jax.jit(lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)),
                                      jnp.zeros((1, c.text_len), jnp.int32)))()['params']
  predictor = predict.Predictor(model, mesh)
  ev = zeroshot.ZeroShotEvaluator(
      predictor, tokenizer='bytes', text_len=c.text_len, pp_img='decode|value_range(-1, 1)',
      dataset='mmcl_shapes/tiny', split='test', data_dir=shapes_data_dir, batch_size=256,
      tasks=dict(shape=dict(label_key='shape', prompts='mmcl_shapes/shape')),
      naflex=dict(patch_size=8, budgets=(16, 64)))
  got = ev.run(params)
  assert predictor.image_fn._cache_size() == 2  # pylint: disable=protected-access
  task = ev.sources[0]['tasks']['shape']
  classifier = zeroshot.class_embeddings(predictor, params, task['classnames'],
                                         task['prompts'], ev.tokenizer, c.text_len)
  ds = input_pipeline.get_builder('mmcl_shapes/tiny', shapes_data_dir).as_dataset(split='test')
  rows = list(ds.as_numpy_iterator())
  images = np.stack([r['image'] for r in rows]).astype(np.float32) / 255 * 2 - 1
  labels = np.array([r['shape'] for r in rows])
  for budget, side in ((16, 32), (64, 64)):
    resized = tf.image.resize(images, (side, side), antialias=True).numpy()
    z = predictor.images(params, resized)
    want = np.mean(np.argmax(z @ classifier.T, axis=1) == labels)
    assert got[f'zeroshot/mmcl_shapes/budget{budget}/shape/top1'] == want
  assert not any('budget' not in k for k in got)
  with pytest.raises(ValueError, match='must be dict'):
    zeroshot.naflex_budgets(dict(patch_size=8, budgets=()))


def test_config_errors_name_the_clash(shapes_data_dir):
  from mmcl.train import validate  # pylint: disable=g-import-not-at-top
  c = _tiny_naflex(shapes_data_dir)
  c.model.image.patch_dropout = 0.5
  with pytest.raises(ValueError, match='patch_dropout'):
    validate.validate(c)
  c.model.image.patch_dropout, c.naflex.budget = 0.0, -3
  with pytest.raises(ValueError, match='config.naflex.budget=-3'):
    validate.validate(c)
  c.naflex.budget, c.naflex.draw = 16, (4, 64)
  with pytest.raises(ValueError, match=r'config.naflex.draw=\(4, 64\) must be budgets in'):
    validate.validate(c)
  # The first batch at another budget than the step was built for: the error names the knob.
  from mmcl.train import loop  # pylint: disable=g-import-not-at-top
  c.naflex.draw = ()
  mesh = mesh_lib.create_mesh((('data', -1),))
  want = loop._batch_shapes(c, mesh)  # pylint: disable=protected-access
  c.naflex.budget = 64
  got = loop._batch_shapes(c, mesh)  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"'image' has shape \(32, 64, 192\).*naflex.budget"):
    validate.check_batch(got, want)


def test_tiny_naflex_demo_trains_and_reports_zeroshot_at_two_budgets(shapes_data_dir, tmp_path):
  from mmcl.train import loop  # pylint: disable=g-import-not-at-top
  from mmcl.train import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  c = _tiny_naflex(shapes_data_dir)
  c.total_steps, c.log_every, c.ckpt_every = 2, 1, 100
  c.evals = {'zeroshot': c.evals.zeroshot}
  s = loop.setup(c)
  assert s.batch_shapes['image'].shape == (32, 64, 8 * 8 * 3)
  assert s.batch_shapes['patch_mask'].dtype == np.bool_
  final = loop._run(c, str(tmp_path), s)  # pylint: disable=protected-access
  losses = [r['train/loss'] for r in metrics_lib.read_metrics(str(tmp_path))
            if 'train/loss' in r]
  assert len(losses) == 2 and np.isfinite(losses).all()
  for budget in (16, 64):
    for task in ('shape', 'color', 'combo'):
      assert 0 <= final[f'zeroshot/mmcl_shapes/budget{budget}/{task}/top1'] <= 1


def test_bench_batch_matches_the_step_shapes(shapes_data_dir):
  from mmcl.train import loop  # pylint: disable=g-import-not-at-top
  from tools import bench_step  # pylint: disable=g-import-not-at-top
  c = _tiny_naflex(shapes_data_dir)
  c.naflex.budget = 20  # Not a square: a 4 x 4 grid and 4 padding tokens.
  mesh = mesh_lib.create_mesh((('data', -1),))
  shapes = loop._batch_shapes(c, mesh)  # pylint: disable=protected-access
  batch = bench_step.random_batch(c, c.batch_size)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in shapes.items()}
  assert batch['patch_mask'].sum(axis=1).tolist() == [16] * c.batch_size
  assert (batch['image'][:, 16:] == 0).all()
