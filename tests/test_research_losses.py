"""Every registered loss, under every impl it registers, against an independent float64
reference: values and gradients.

Each reference is written directly from the formula in the loss's docstring (full B x B
matrices, no collectives, no library code) and evaluated in float64; the library runs in
float32 on sharded inputs, globally, per shard (gather) and around the ring. A registered
loss without a reference here fails `test_loss_matches_float64_reference`.
"""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl import losses
from mmcl.parallel import mesh as mesh_lib

MESHES = [[('data', 8)], [('data', 2), ('fsdp', 4)]]

# Non-default options where a loss has them, so the option plumbing is exercised.
OPTIONS = {
    'align_uniform': dict(align_weight=0.7, unif_weight=1.3, clip_weight=0.5),
    'focal': dict(gamma=2.0),
    'hard_negative': dict(beta=0.5),
}


def _log_softmax_rows(logits):
  return logits - jnp.log(jnp.sum(jnp.exp(logits), axis=1, keepdims=True))


def _ref_softmax(x, y, scale, extras, **_):
  del extras
  logits = scale * x @ y.T
  return -(jnp.mean(jnp.diag(_log_softmax_rows(logits))) +
           jnp.mean(jnp.diag(_log_softmax_rows(logits.T)))) / 2


def _ref_sigmoid(x, y, scale, extras, bias):
  del extras
  signs = 2 * jnp.eye(x.shape[0]) - 1
  return -jnp.sum(jnp.log(1 / (1 + jnp.exp(-signs * (scale * x @ y.T + bias))))) / x.shape[0]


def _ref_dcl(x, y, scale, extras, **_):
  del extras
  off_diag = 1.0 - jnp.eye(x.shape[0])
  def one_direction(logits):
    return jnp.mean(jnp.log(jnp.sum(off_diag * jnp.exp(logits), axis=1)) - jnp.diag(logits))
  logits = scale * x @ y.T
  return (one_direction(logits) + one_direction(logits.T)) / 2


def _ref_auc(x, y, scale, extras, **_):
  del extras
  n = x.shape[0]
  off_diag = 1.0 - jnp.eye(n)
  def one_direction(logits):
    margins = jnp.diag(logits)[:, None] - logits
    return jnp.sum(off_diag * jnp.log1p(jnp.exp(-margins))) / (n * (n - 1))
  logits = scale * x @ y.T
  return (one_direction(logits) + one_direction(logits.T)) / 2


def _ref_focal(x, y, scale, extras, gamma):
  del extras
  def one_direction(logits):
    p = jnp.diag(jnp.exp(_log_softmax_rows(logits)))
    return jnp.mean(-(1 - p)**gamma * jnp.log(p))
  logits = scale * x @ y.T
  return (one_direction(logits) + one_direction(logits.T)) / 2


def _ref_hard_negative(x, y, scale, extras, beta):
  del extras
  n = x.shape[0]
  off_diag = 1.0 - jnp.eye(n)
  def one_direction(logits):
    unnorm = off_diag * jnp.exp(beta * logits)
    w = (n - 1) * unnorm / jnp.sum(unnorm, axis=1, keepdims=True)
    denom = jnp.exp(jnp.diag(logits)) + jnp.sum(off_diag * w * jnp.exp(logits), axis=1)
    return jnp.mean(jnp.log(denom) - jnp.diag(logits))
  logits = scale * x @ y.T
  return (one_direction(logits) + one_direction(logits.T)) / 2


def _ref_soft_targets(logits, w):
  """Both directions of the w-weighted mean of -log softmax over each row (w symmetric)."""
  def one_direction(logits):
    return jnp.mean(-jnp.sum(w * _log_softmax_rows(logits), 1) / jnp.sum(w, 1))
  return (one_direction(logits) + one_direction(logits.T)) / 2


def _ref_multi_positive(x, y, scale, extras, **_):
  labels = extras['labels']
  same = (labels[:, None] == labels[None, :]).astype(x.dtype)
  return _ref_soft_targets(scale * x @ y.T, same)


def _ref_cwcl(x, y, scale, extras, **_):
  u = extras['frozen']
  u = u / jnp.sqrt(jnp.sum(u * u, axis=1, keepdims=True))
  return _ref_soft_targets(scale * x @ y.T, (1 + u @ u.T) / 2)


def _ref_symile(x, y, scale, extras, **_):
  z = extras['zthird']
  def term(candidates, fixed1, fixed2):
    # logits[i, j] = t * MIP(candidates_j, fixed1_i, fixed2_i).
    logits = scale * jnp.einsum('jd,id,id->ij', candidates, fixed1, fixed2)
    return -jnp.mean(jnp.diag(_log_softmax_rows(logits)))
  return (term(x, y, z) + term(y, x, z) + term(z, x, y)) / 3


def _ref_align_uniform(x, y, scale, extras, align_weight, unif_weight, clip_weight):
  del extras
  n = x.shape[0]
  off_diag = 1.0 - jnp.eye(n)
  def unif(z):
    sq_dist = jnp.sum((z[:, None, :] - z[None, :, :])**2, axis=2)
    return jnp.log(jnp.sum(off_diag * jnp.exp(-2 * sq_dist)) / (n * (n - 1)))
  align = jnp.mean(jnp.sum((x - y)**2, axis=1))
  logits = scale * x @ y.T
  clip = -(jnp.mean(jnp.diag(_log_softmax_rows(logits)))
           + jnp.mean(jnp.diag(_log_softmax_rows(logits.T)))) / 2
  return (clip_weight * clip + align_weight * align
          + unif_weight * (unif(x) + unif(y)) / 2)


REFERENCES = {
    'align_uniform': _ref_align_uniform,
    'auc': _ref_auc,
    'cwcl': _ref_cwcl,
    'dcl': _ref_dcl,
    'focal': _ref_focal,
    'hard_negative': _ref_hard_negative,
    'multi_positive': _ref_multi_positive,
    'sigmoid': _ref_sigmoid,
    'softmax': _ref_softmax,
    'symile': _ref_symile,
}


def _unit(x):
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def _inputs(name, seed, batch=32, dim=16):
  """Unit-norm embeddings with correlated positives, a scale, and the loss's extras.

  Returns (zimg, ztxt, scale, diff_extras, const_extras): float extras that the loss
  trains through (and whose gradients are checked) are kept apart from constant ones.
  """
  rng = np.random.default_rng(seed)
  zimg = _unit(rng.normal(size=(batch, dim)))
  ztxt = _unit(zimg + 0.7 * rng.normal(size=(batch, dim)))
  diff_extras, const_extras = {}, {}
  if name == 'symile':
    diff_extras['zthird'] = _unit(zimg + ztxt + 0.7 * rng.normal(size=(batch, dim)))
  elif name == 'multi_positive':
    # About 4 rows per group, so most rows have several positives.
    const_extras['labels'] = rng.integers(0, batch // 4, size=batch).astype(np.int32)
  elif name == 'cwcl':
    const_extras['frozen'] = zimg[:, :8] + 0.5 * rng.normal(size=(batch, 8))
  return zimg, ztxt, rng.uniform(2.0, 20.0), diff_extras, const_extras


def _library_value_and_grads(fn, mesh, zimg, ztxt, scale, diff_extras, const_extras,
                             bias=None):
  """jit(value_and_grad) of the library loss on float32 batch-sharded inputs; the gradients
  of (zimg, ztxt, scale, diff_extras, bias), bias's None when the loss has none."""
  sharding = mesh_lib.batch_sharding(mesh)
  def put(x):
    x = np.asarray(x)
    return jax.device_put(x.astype(np.float32) if x.dtype == np.float64 else x, sharding)

  def loss(zi, zt, s, dx, cx, b):
    return fn(zi, zt, s, b, extras={**dx, **cx})[0]

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 5)))
  return grad_fn(put(zimg), put(ztxt), jnp.float32(scale),
                 {k: put(v) for k, v in diff_extras.items()},
                 {k: put(v) for k, v in const_extras.items()},
                 None if bias is None else jnp.float32(bias))


def _cases():
  """Every (loss, impl) pair the registry offers, on each mesh."""
  return [(name, impl, mesh) for name in losses.registered_losses()
          for impl in losses.get_loss(name, 'global').impls for mesh in MESHES]


@pytest.mark.parametrize('name,impl,mesh_config', _cases())
def test_loss_matches_float64_reference(name, impl, mesh_config):
  if name not in REFERENCES:
    pytest.fail(f'Registered loss {name!r} has no float64 reference: add one to REFERENCES '
                'in tests/test_research_losses.py (docs/losses.md, "Test it").')
  mesh = mesh_lib.create_mesh(mesh_config)
  options = OPTIONS.get(name, {})
  zimg, ztxt, scale, diff_extras, const_extras = _inputs(
      name, seed=zlib.crc32(f'{name}/{impl}/{mesh_config}'.encode()))
  # chunk=2 tiles each device's 4 rows into 2 x 2 tiles: the ring folds several tiles per
  # block and several blocks per row, the paths a large batch takes.
  fn = losses.make_loss_fn(name, impl, mesh, chunk=2, **options)
  # SigLIP-like biases: negative, of a few units.
  bias = -1 - zlib.crc32(name.encode()) % 700 / 100 if losses.get_loss(name).needs_bias else None
  value, grads = _library_value_and_grads(
      fn, mesh, zimg, ztxt, scale, diff_extras, const_extras, bias)

  with jax.enable_x64(True):
    ref = functools.partial(REFERENCES[name], **options)
    const64 = {k: jnp.asarray(v) for k, v in const_extras.items()}
    bias_kw = lambda b: {} if b is None else {'bias': b}
    ref_value, ref_grads = jax.value_and_grad(
        lambda zi, zt, s, dx, b: ref(zi, zt, s, {**dx, **const64}, **bias_kw(b)),
        argnums=(0, 1, 2, 3, 4))(
            jnp.asarray(zimg), jnp.asarray(ztxt), jnp.float64(scale),
            {k: jnp.asarray(v) for k, v in diff_extras.items()},
            None if bias is None else jnp.float64(bias))
    ref_value, ref_grads = np.asarray(ref_value), jax.tree.map(np.asarray, ref_grads)

  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
  assert jax.tree.structure(grads) == jax.tree.structure(ref_grads)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(ref_grads)):
    np.testing.assert_allclose(np.asarray(g), r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name,options', [('hard_negative', dict(beta=0.0)),
                                          ('focal', dict(gamma=0.0)),
                                          ('multi_positive', {})])
def test_reduces_to_softmax(name, options):
  """beta = 0, gamma = 0 and all-distinct group ids are each exactly the CLIP loss."""
  mesh = mesh_lib.create_mesh([('data', 8)])
  zimg, ztxt, scale, _, _ = _inputs(name, seed=7)
  extras = {}
  if name == 'multi_positive':  # Distinct ids: each row's only positive is its pair.
    extras['labels'] = np.random.default_rng(0).permutation(len(zimg)).astype(np.int32)
  value, grads = _library_value_and_grads(
      losses.make_loss_fn(name, 'gather', mesh, **options), mesh, zimg, ztxt, scale, {},
      extras)
  clip_value, clip_grads = _library_value_and_grads(
      losses.make_loss_fn('softmax', 'gather', mesh), mesh, zimg, ztxt, scale, {}, {})
  np.testing.assert_allclose(value, clip_value, rtol=1e-6)
  for g, r in zip(jax.tree.leaves(grads), jax.tree.leaves(clip_grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-7)


def test_frozen_embeddings_get_no_gradient():
  mesh = mesh_lib.create_mesh([('data', 8)])
  zimg, ztxt, scale, _, const_extras = _inputs('cwcl', seed=5)
  fn = losses.make_loss_fn('cwcl', 'gather', mesh)
  grad = jax.jit(jax.grad(lambda u: fn(zimg, ztxt, scale, extras={'frozen': u})[0]))(
      const_extras['frozen'].astype(np.float32))
  assert not np.any(np.asarray(grad))


def test_missing_or_misshapen_extras_are_clear_errors():
  mesh = mesh_lib.create_mesh([('data', 8)])
  zimg, ztxt, scale, _, _ = _inputs('symile', seed=1, batch=16)
  fn = losses.make_loss_fn('multi_positive', 'gather', mesh)
  with pytest.raises(ValueError, match=r"'multi_positive' loss needs extras\['labels'\]"):
    fn(zimg, ztxt, scale)
  with pytest.raises(ValueError, match=r"extras\['labels'\] has shape \(8,\).*batch 16"):
    fn(zimg, ztxt, scale, extras={'labels': np.arange(8)})
