"""Resolution and tokens: FLIP patch dropout, position-embedding resampling, FlexiViT.

Sharded paths run on the 8 forced host devices (batch split over a ('data', 8) mesh) and are
compared with a single-device float64 reference.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from mmcl import models
from mmcl.models import flexi
from mmcl.models import patch_dropout
from mmcl.models import posemb
from mmcl.models import vit
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import model_init
from mmcl.train import variants

B, IMG = 8, 32


def _mesh():
  return mesh_lib.create_mesh((('data', 8),))


def _sharded(x):
  return jax.device_put(x, mesh_lib.batch_sharding(_mesh()))


def _image(b=B, size=IMG, seed=1):
  return jax.random.normal(jax.random.key(seed), (b, size, size, 3))


# ------------------------------------------------------------------------------ patch dropout


@pytest.mark.parametrize('n, ratio, keep', [(16, 0.5, 8), (16, 0.75, 4), (49, 0.5, 24),
                                            (10, 0.95, 1)])
def test_kept_count_is_round_n_times_one_minus_ratio(n, ratio, keep):
  assert patch_dropout.kept_count(n, ratio) == keep


def test_patch_dropout_keeps_exactly_k_distinct_tokens_per_image_sharded():
  n, d, ratio = 16, 4, 0.75
  x_BxNxD = np.arange(B * n * d, dtype=np.float32).reshape(B, n, d)  # Every row distinct.
  rng = jax.random.key(3)
  drop = jax.jit(lambda x: patch_dropout.drop_patches(x, ratio, rng))
  out = np.asarray(drop(_sharded(x_BxNxD)))
  k = patch_dropout.kept_count(n, ratio)
  assert out.shape == (B, k, d)
  chosen = []
  for i in range(B):  # Each kept token is one of its own image's tokens, none twice.
    idx = [int(np.flatnonzero((x_BxNxD[i] == t).all(-1))[0]) for t in out[i]]
    assert len(set(idx)) == k and idx == sorted(idx)
    chosen.append(tuple(idx))
  assert len(set(chosen)) > 1  # Per-example draws, not one subset for the batch.
  # The sharded draw is the single-device one.
  np.testing.assert_array_equal(out, patch_dropout.drop_patches(x_BxNxD, ratio, rng))


def _vit(**kw):  # Small: compiling, not computing, is what a CPU test pays for.
  return vit.ViT(**{'width': 16, 'depth': 1, 'mlp_dim': 32, 'num_heads': 2, 'patch_size': 8,
                    'num_classes': 8, 'pool': 'gap', **kw})


def _params(model, *args):
  """Random params shaped like model.init's, drawn in numpy (an init compiles for seconds)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(model.init, jax.random.key(0), *args)
  return jax.tree.map(lambda a: jnp.asarray(0.3 * rng.standard_normal(a.shape), a.dtype), shapes)


@pytest.mark.parametrize('kw', [dict(pool='tok'), dict(pool='map', depth=2, scan=True,
                                                      remat='full'),
                                dict(depth=2, moe=dict(num_experts=2, group_size=8))])
def test_vit_patch_dropout_in_training_only(kw):
  image = _sharded(_image())
  model, plain = _vit(patch_dropout=0.5, **kw), _vit(**kw)
  params = _params(plain, image)

  @jax.jit
  def run(params, image):
    train = model.apply(params, image, train=True, rngs={'dropout': jax.random.key(1)})[1]
    return train['encoded'], model.apply(params, image)[0], plain.apply(params, image)[0]

  encoded, z_eval, z_plain = run(params, image)
  cls = int(kw.get('pool') == 'tok')
  assert encoded.shape[1] == patch_dropout.kept_count(16, 0.5) + cls
  np.testing.assert_array_equal(z_eval, z_plain)  # Identity at evaluation.


def test_limoe_drops_image_tokens_only():
  cfg = dict(name='limoe', width=16, depth=2, mlp_dim=32, num_heads=2, patch_size=8,
             moe=dict(num_experts=2, group_size=8), vocab_size=50, max_len=8, embed_dim=8,
             patch_dropout=0.5)
  model, plain = models.get_model(cfg), models.get_model({**cfg, 'patch_dropout': 0.0})
  image, text = _sharded(_image()), _sharded(jnp.ones((B, 8), jnp.int32))
  params = _params(model, image, text)

  @jax.jit
  def run(params, image, text):
    rngs = {'dropout': jax.random.key(1)}
    return (model.apply(params, image, text, train=True, rngs=rngs)[:2],
            plain.apply(params, image, text, train=True, rngs=rngs)[:2],
            model.apply(params, image, None)[0], plain.apply(params, image, None)[0])

  (zimg, ztxt), (ref_img, ref_txt), z_eval, z_plain = run(params, image, text)
  np.testing.assert_array_equal(ztxt, ref_txt)  # Texts untouched.
  assert not np.allclose(zimg, ref_img, atol=1e-3)  # Images saw half their tokens.
  np.testing.assert_array_equal(z_eval, z_plain)


def test_unmasked_phase_and_flexi_sizes_pick_a_variant_per_step():
  c = demo.get_config('tiny')
  c.unmasked_from_step = 5
  assert variants.variant_key(c, 4) == ()
  assert variants.variant_key(c, 5) == variants.variant_key(c, 20) == (('patch_dropout', 0.0),)
  c.unmasked_from_step, c.flexi_patch_sizes = 0, (4, 8, 16)
  with pytest.raises(ValueError, match='needs config.model.image.posemb_grid'):
    variants.check(c)
  c.model.image.posemb_grid = 8
  variants.check(c)
  keys = [variants.variant_key(c, s) for s in range(1, 41)]
  assert keys == [variants.variant_key(c, s) for s in range(1, 41)]  # A function of the step.
  assert {dict(k)['apply_patch_size'] for k in keys} == {4, 8, 16}
  c.flexi_patch_sizes = (5,)
  with pytest.raises(ValueError, match='do not divide config.image_size'):
    variants.check(c)
  limoe = variants.image_fields({'name': 'limoe'}, patch_dropout=0.0)
  assert limoe == {'name': 'limoe', 'patch_dropout': 0.0}
  with pytest.raises(ValueError, match='takes patch_dropout only'):
    variants.image_fields({'name': 'limoe'}, apply_patch_size=8)


def test_step_variants_build_one_model_per_variant_lazily():
  c = demo.get_config('tiny')
  c.model.image.patch_dropout, c.unmasked_from_step, c.flexi_patch_sizes = 0.5, 3, (4, 8)
  built = []
  steps = variants.StepVariants(c, lambda model, distill: built.append(model) or model)
  keys = set()
  for step in range(1, 9):
    model = steps(step)
    key = dict(variants.variant_key(c, step))
    keys.add(steps.key(step))
    assert model.image['apply_patch_size'] == key['apply_patch_size']
    assert model.image['patch_dropout'] == (0.0 if step >= 3 else 0.5)
  assert len(built) == len(keys) <= 4  # Each variant built once.


# ------------------------------------------------------------------------- posemb resampling


@pytest.mark.parametrize('method', posemb.METHODS)
def test_resample_to_its_own_grid_is_the_identity(method):
  pos = np.random.default_rng(0).standard_normal((1, 7 * 5, 6)).astype(np.float32)
  np.testing.assert_array_equal(posemb.resample(pos, (7, 5), (7, 5), method), pos)


@pytest.mark.parametrize('method', posemb.METHODS)
@pytest.mark.parametrize('new', [(14, 14), (3, 5), (4, 11)])
def test_a_constant_field_stays_constant(method, new):
  pos = np.full((1, 49, 3), 0.37, np.float32)
  out = posemb.resample(pos, new, method=method)
  assert out.shape == (1, new[0] * new[1], 3)
  np.testing.assert_allclose(out, 0.37, rtol=1e-5)


def test_bilinear_upsample_of_a_linear_ramp_is_the_ramp_inside():
  # A field linear in the row index is reproduced exactly between the outer half-pixels.
  g = 4
  rows = np.repeat(np.arange(g, dtype=np.float32), g)
  pos = rows.reshape(1, g * g, 1)
  out = np.asarray(posemb.resample(pos, (2 * g, 2 * g))).reshape(2 * g, 2 * g)
  centres = (np.arange(2 * g) + 0.5) / 2 - 0.5  # Old-grid coordinate of each new row.
  inside = (centres >= 0) & (centres <= g - 1)
  np.testing.assert_allclose(out[inside, 0], centres[inside], atol=1e-6)


def test_model_init_resamples_an_image_posemb_and_explains_a_text_one():
  rng = np.random.default_rng(0)
  fresh = {'img': {'pos_embedding': np.zeros((1, 16, 4), np.float32)},
           'txt': {'pos_embedding': np.zeros((1, 8, 4), np.float32)}}
  loaded = {'img': {'pos_embedding': rng.standard_normal((1, 4, 4)).astype(np.float32)},
            'txt': {'pos_embedding': rng.standard_normal((1, 8, 4)).astype(np.float32)}}
  out = model_init.merge(fresh, loaded)
  np.testing.assert_allclose(out['img']['pos_embedding'],
                             posemb.resample(loaded['img']['pos_embedding'], (4, 4)))
  loaded['txt']['pos_embedding'] = np.zeros((1, 16, 4), np.float32)
  with pytest.raises(ValueError, match='1-D text position embedding of another length'):
    model_init.merge(fresh, loaded)
  loaded['txt']['pos_embedding'] = np.zeros((1, 8, 4), np.float32)
  loaded['img']['pos_embedding'] = np.zeros((1, 6, 4), np.float32)
  with pytest.raises(ValueError, match='6 positions, not a square grid'):
    model_init.merge(fresh, loaded)


def test_vit_with_a_posemb_grid_runs_at_other_resolutions():
  model = _vit(posemb_grid=4)  # Stored at 4 x 4 (32 px / 8).
  params = _params(model, _image(2))
  assert params['params']['pos_embedding'].shape == (1, 16, 16)

  @jax.jit
  def run(params, small, large):
    return (model.apply(params, small)[0], _vit().apply(params, small)[0],
            model.apply(params, large))

  z32, z_plain, (z64, out) = run(params, _image(2), _sharded(_image(size=64)))
  np.testing.assert_array_equal(z32, z_plain)  # Its own grid: the plain ViT.
  assert out['encoded'].shape[1] == 64 and np.all(np.isfinite(z64))


# ------------------------------------------------------------------------------------ FlexiViT


@pytest.mark.parametrize('old, new', [(8, 16), (4, 6), (16, 8), (5, 3)])
def test_resize_matrix_is_jax_image_resize(old, new):
  x = np.random.default_rng(0).standard_normal((old, old)).astype(np.float32)
  want = jax.image.resize(x, (new, new), 'bilinear', antialias=False).reshape(-1)
  np.testing.assert_allclose(flexi.resize_matrix(old, new) @ x.reshape(-1), want, atol=1e-5)


@pytest.mark.parametrize('old, new', [(8, 16), (4, 6), (8, 8)])
def test_pi_resize_is_exact_when_upsampling(old, new):
  """<x, w> == <B x, PI-resize(w)> for any x (FlexiViT, eq. for q >= p), float64."""
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, old, old, 3))
    w = rng.standard_normal((old, old, 3, 7))
    w_hat = flexi.pi_resize(jnp.asarray(w), new)
    lhs = np.einsum('bhwc,hwcd->bd', x, w)
    rhs = np.einsum('bhwc,hwcd->bd', flexi.resize_image(jnp.asarray(x), new), w_hat)
    np.testing.assert_allclose(rhs, lhs, rtol=1e-9, atol=1e-9)


def test_pi_resize_keeps_the_tokens_of_a_smooth_image_when_downsampling():
  """Downsampling (q < p) is least squares: <B x, w_hat> = <x, P w>, P the projection onto
  the range of B^T. Exact for x in that range (x = B^T y); for a smooth patch (a low-frequency
  sinusoid, period 8 patches) the tokens stay within 5% (relative norm; 2-3% measured), while a plain bilinear resize of the
  kernel is off by far more (FlexiViT's comparison of resize methods)."""
  old, new = 16, 8
  with jax.enable_x64(True):
    rng = np.random.default_rng(0)
    w = rng.standard_normal((old, old, 3, 32))
    w_hat = np.asarray(flexi.pi_resize(jnp.asarray(w), new))
    y = rng.standard_normal((4, new * new, 3))
    x = np.einsum('qp,bqc->bpc', flexi.resize_matrix(old, new), y).reshape(4, old, old, 3)
    np.testing.assert_allclose(
        np.einsum('bhwc,hwcd->bd', flexi.resize_image(jnp.asarray(x), new), w_hat),
        np.einsum('bhwc,hwcd->bd', x, w), rtol=1e-8, atol=1e-8)
    yy, xx = np.meshgrid(np.arange(old), np.arange(old), indexing='ij')
    phase = rng.uniform(0, 2 * np.pi, (4, 1, 1, 3))
    smooth = np.sin(2 * np.pi * (yy + 0.5 * xx)[None, :, :, None] / (8 * old) + phase)
    ref = np.einsum('bhwc,hwcd->bd', smooth, w)
    small = np.asarray(flexi.resize_image(jnp.asarray(smooth), new))
    pi = np.einsum('bhwc,hwcd->bd', small, w_hat)
    naive_w = np.asarray(jax.image.resize(w, (new, new, 3, 32), 'bilinear'))
    naive = np.einsum('bhwc,hwcd->bd', small, naive_w)
    rel = lambda y: np.linalg.norm(y - ref) / np.linalg.norm(ref)
    assert rel(pi) < 0.05, rel(pi)
    assert rel(naive) > 10 * rel(pi)


def test_flexi_vit_same_patch_size_is_the_plain_vit_and_other_sizes_run_sharded():
  base = _vit(posemb_grid=4)
  params = _params(base, _image(2))
  same = _vit(posemb_grid=4, apply_patch_size=8)
  assert jax.tree.map(np.shape, jax.eval_shape(same.init, jax.random.key(0), _image(2))) == (
      jax.tree.map(np.shape, params))  # Same parameter layout.
  np.testing.assert_allclose(same.apply(params, _image(2))[0], base.apply(params, _image(2))[0],
                             atol=1e-6)
  image = np.asarray(_image())  # Drawn outside enable_x64 (which changes the draw).
  for p in (4, 16):  # One checkpoint, other patch sizes, batch over 8 devices.
    model = _vit(posemb_grid=4, apply_patch_size=p)
    z, out = jax.jit(model.apply)(params, _sharded(image))
    assert out['encoded'].shape[1] == (IMG // p) ** 2
    with jax.enable_x64(True):  # The float64 single-device reference.
      p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
      ref = _vit(posemb_grid=4, apply_patch_size=p, dtype='float64').apply(
          p64, image.astype(np.float64))[0]
    np.testing.assert_allclose(z, ref, atol=1e-4)


# ------------------------------------------------------------------------------ NaFlex blocks


def _naflex_batch(rng, grids, budget, d):
  """Tokens of images with grids (h, w), padded to `budget`: x, valid, rows, cols."""
  b = len(grids)
  x = rng.standard_normal((b, budget, d)).astype(np.float32)  # Padding holds noise too.
  valid = np.zeros((b, budget), bool)
  rows = np.full((b, budget), -1, np.int32)
  cols = np.full((b, budget), -1, np.int32)
  for i, (h, w) in enumerate(grids):
    valid[i, :h * w] = True
    rows[i, :h * w], cols[i, :h * w] = np.divmod(np.arange(h * w), w)
  return x, valid, rows, cols


def test_naflex_padded_attention_and_pooling_equal_each_image_alone():
  from mmcl.models import naflex  # pylint: disable=g-import-not-at-top
  from mmcl.models import transformer  # pylint: disable=g-import-not-at-top
  # 8 images, two token counts (8, 9): the per-image reference then compiles twice, not 8x.
  grids = [(2, 4), (3, 3), (4, 2), (1, 9), (8, 1), (9, 1), (1, 8), (3, 3)]
  budget, d = 12, 16
  x, valid, rows, cols = _naflex_batch(np.random.default_rng(0), grids, budget, d)
  enc = transformer.Encoder(depth=1, mlp_dim=32, num_heads=2)
  params = enc.init(jax.random.key(0), x[:1, :4])

  @jax.jit
  def padded(params, x, valid):
    y, _ = enc.apply(params, x, naflex.attention_mask(valid))
    return naflex.masked_mean(y, valid)

  out = padded(params, _sharded(x), _sharded(valid))
  with jax.enable_x64(True):  # Reference: each image alone, unpadded, in float64.
    p64 = jax.tree.map(lambda a: np.asarray(a, np.float64), params)
    enc64 = transformer.Encoder(depth=1, mlp_dim=32, num_heads=2, dtype=jnp.float64)
    for i, (h, w) in enumerate(grids):
      alone, _ = enc64.apply(p64, x[i:i + 1, :h * w].astype(np.float64))
      np.testing.assert_allclose(out[i], np.asarray(alone).mean(axis=1)[0], atol=1e-5)


def test_naflex_posemb_is_each_image_grid_resampled():
  from mmcl.models import naflex  # pylint: disable=g-import-not-at-top
  grids = [(2, 4), (3, 3), (4, 2), (1, 5), (3, 4), (2, 2), (4, 3), (5, 1)]
  budget, d = 12, 6
  _, _, rows, cols = _naflex_batch(np.random.default_rng(0), grids, budget, d)
  pos = np.random.default_rng(1).standard_normal((1, 16, d)).astype(np.float32)  # 4 x 4.
  hw = np.array(grids, np.int32)
  got = jax.jit(lambda *a: naflex.posemb_per_image(pos, *a, max_grid=5))(
      _sharded(hw), _sharded(rows), _sharded(cols))
  for i, (h, w) in enumerate(grids):
    want = posemb.resample(pos, (h, w))[0]
    np.testing.assert_allclose(got[i, :h * w], want, atol=1e-5)
