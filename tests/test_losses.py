"""Distributed losses against a single-device float64 reference, values and gradients."""
import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl import losses
from mmcl.parallel import mesh as mesh_lib


def _reference(name, zimg, ztxt, scale, bias):
  """Plain numpy-style formulas from the papers, run in float64."""
  logits = scale * zimg @ ztxt.T
  n = zimg.shape[0]
  if name == 'softmax':
    i2t = jnp.mean(jax.nn.logsumexp(logits, 1) - jnp.diag(logits))
    t2i = jnp.mean(jax.nn.logsumexp(logits, 0) - jnp.diag(logits))
    return (i2t + t2i) / 2
  if name == 'sigmoid':
    z = 2 * jnp.eye(n) - 1
    return -jnp.sum(jax.nn.log_sigmoid(z * (logits + bias))) / n
  raise ValueError(name)


def _inputs(seed, batch=32, dim=16):
  rng = np.random.default_rng(seed)
  def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  zimg = unit(rng.normal(size=(batch, dim)))
  # Correlated texts so positives score higher than negatives, as in training.
  ztxt = unit(zimg + 0.7 * rng.normal(size=(batch, dim)))
  return zimg, ztxt, rng.uniform(2.0, 20.0), rng.uniform(-8.0, 0.0)


@pytest.mark.parametrize('mesh_config', [[('data', 8)], [('data', 4), ('fsdp', 2)],
                                         [('data', 2), ('fsdp', 4)]])
@pytest.mark.parametrize('impl', ['gather', 'global', 'ring'])
@pytest.mark.parametrize('name', ['softmax', 'sigmoid'])
def test_loss_matches_float64_reference(name, impl, mesh_config):
  mesh = mesh_lib.create_mesh(mesh_config)
  zimg, ztxt, scale, bias = _inputs(seed=zlib.crc32(f'{name}/{impl}/{mesh_config}'.encode()))
  fn = losses.make_loss_fn(name, impl, mesh, chunk=2)  # 2 x 2 tiles of 4 local rows.
  sharding = mesh_lib.batch_sharding(mesh)

  def loss(zi, zt, s, b):
    return fn(zi, zt, s, b)[0]

  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))
  args32 = (jax.device_put(zimg.astype(np.float32), sharding),
            jax.device_put(ztxt.astype(np.float32), sharding),
            jnp.float32(scale), jnp.float32(bias))
  value, grads = grad_fn(*args32)
  with jax.enable_x64(True):
    ref_value, ref_grads = jax.value_and_grad(
        functools.partial(_reference, name), argnums=(0, 1, 2, 3))(
            jnp.asarray(zimg), jnp.asarray(ztxt), jnp.float64(scale), jnp.float64(bias))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
  for g, r in zip(grads, ref_grads):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
  if name == 'softmax':  # no bias in CLIP: its gradient must be exactly zero.
    assert float(grads[3]) == 0.0


def test_gathered_rows_keep_global_order():
  """Shard i's rows must be rows [i*b, (i+1)*b) of the global batch, for 2-D meshes too."""
  mesh = mesh_lib.create_mesh([('data', 4), ('fsdp', 2)])
  zimg, ztxt, scale, _ = _inputs(seed=3)
  perm = np.random.default_rng(0).permutation(len(zimg))
  # Misaligned pairs must give a different (larger) loss: labels are tied to positions.
  fn = jax.jit(losses.make_loss_fn('softmax', 'gather', mesh))
  aligned = fn(zimg.astype(np.float32), ztxt.astype(np.float32), np.float32(scale))[0]
  shuffled = fn(zimg.astype(np.float32), ztxt[perm].astype(np.float32), np.float32(scale))[0]
  assert float(shuffled) > float(aligned) + 0.1


def test_unknown_loss_and_impl_name_valid_choices():
  mesh = mesh_lib.create_mesh([('data', -1)])
  with pytest.raises(ValueError, match=r"Unknown loss 'nope'.*softmax"):
    losses.make_loss_fn('nope', 'gather', mesh)
  with pytest.raises(ValueError, match=r"no impl 'ring'.*gather"):
    losses.make_loss_fn('multi_positive', 'ring', mesh)  # Needs whole rows.
  with pytest.raises(ValueError, match=r"Unknown loss impl 'tiled'.*ring"):
    losses.make_loss_fn('softmax', 'tiled', mesh)


def test_sigmoid_without_bias_is_a_clear_error():
  mesh = mesh_lib.create_mesh([('data', -1)])
  zimg, ztxt, scale, _ = _inputs(seed=1, batch=8)
  with pytest.raises(ValueError, match='bias_init'):
    losses.contrastive_loss(zimg, ztxt, name='sigmoid', impl='gather', mesh=mesh, scale=scale)


def test_batch_not_divisible_by_shards():
  mesh = mesh_lib.create_mesh([('data', 8)])
  zimg, ztxt, scale, _ = _inputs(seed=2, batch=12)
  with pytest.raises(ValueError, match='12 does not divide over 8'):
    losses.contrastive_loss(zimg, ztxt, name='softmax', mesh=mesh, scale=scale)
