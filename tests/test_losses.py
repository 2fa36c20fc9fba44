"""The loss drivers: global row order, errors, the ring's claim (values against float64
references for every registered loss: tests/test_research_losses.py)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmcl import losses
from mmcl.losses import registry
from mmcl.parallel import mesh as mesh_lib


def _inputs(seed, batch=32, dim=16):
  rng = np.random.default_rng(seed)
  def unit(x):
    return x / np.linalg.norm(x, axis=1, keepdims=True)
  zimg = unit(rng.normal(size=(batch, dim)))
  # Correlated texts so positives score higher than negatives, as in training.
  ztxt = unit(zimg + 0.7 * rng.normal(size=(batch, dim)))
  return zimg, ztxt, rng.uniform(2.0, 20.0), rng.uniform(-8.0, 0.0)


@pytest.fixture
def ring_claiming_gather_loss():
  """A loss registered with 'ring' whose body gathers whole rows instead."""
  @losses.register_loss('_claims_ring', impls=('global', 'gather', 'ring'))
  def loss(zimg_bxD, ztxt_bxD, ctx):
    logits = ctx.scale * zimg_bxD @ ctx.all_gather(ztxt_bxD).T
    return ctx.psum(jnp.sum(jax.nn.logsumexp(logits, axis=1))), {}
  yield '_claims_ring'
  del registry._LOSSES['_claims_ring']


def test_a_loss_claiming_ring_must_run_the_ring(ring_claiming_gather_loss):
  mesh = mesh_lib.create_mesh([('data', 8)])
  zimg, ztxt, scale, _ = _inputs(seed=4, batch=16)
  gather = losses.make_loss_fn(ring_claiming_gather_loss, 'gather', mesh)
  assert np.isfinite(float(jax.jit(gather)(zimg, ztxt, scale)[0]))
  ring = losses.make_loss_fn(ring_claiming_gather_loss, 'ring', mesh)
  with pytest.raises(ValueError, match="'_claims_ring' is registered with impl 'ring' but "
                                       "did not run the ring"):
    jax.jit(ring)(zimg, ztxt, scale)


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
