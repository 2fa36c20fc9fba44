"""Runs a registered loss on global sharded embeddings: globally, or per shard in shard_map."""
import functools

import jax
from jax.sharding import Mesh, PartitionSpec as P

from mmcl.losses import registry, ring
from mmcl.losses.registry import LossContext, get_loss
from mmcl.parallel import mesh as mesh_lib


def make_loss_fn(name: str, impl: str, mesh: Mesh, *, chunk: int = 1024, **options):
  """Returns `fn(zimg_BxD, ztxt_BxD, scale, bias=None, *, extras=None) -> (loss, metrics)`.

  All arguments are global arrays. `extras` maps names to per-row arrays with leading
  dimension B (e.g. `labels`); they are sharded like the embeddings and reach the loss as
  `ctx.extras`. `chunk` is the ring impl's tile side (~chunk^2 logits live at once).
  Validates `name` and `impl` now, so a bad config fails before anything
  compiles.
  """
  spec = get_loss(name, impl)
  axes = mesh_lib.batch_axes(mesh)

  @registry.loss_precision
  def local(zimg, ztxt, scale, bias, extras, axis_names):
    ctx = LossContext(scale=scale, bias=bias, axis_names=axis_names, impl=impl,
                      chunk=chunk, extras=extras)
    before = ring.traces()
    out = spec.fn(zimg, ztxt, ctx, **options)
    if impl == 'ring' and ring.traces() == before:
      raise ValueError(
          f"Loss {name!r} is registered with impl 'ring' but did not run the ring: write it "
          "with rows.row_stats_loss (a RowLoss in statistics form) or call "
          "ring.ring_stats, or drop 'ring' from its register_loss(impls=...).")
    return out

  def fn(zimg_BxD, ztxt_BxD, scale, bias=None, *, extras=None):
    extras = dict(extras or {})
    batch = zimg_BxD.shape[0]
    for key, value in extras.items():
      if value.ndim < 1 or value.shape[0] != batch:
        raise ValueError(f'extras[{key!r}] has shape {value.shape}; its leading dimension '
                         f'must be the global batch {batch}.')
    if impl == 'global' or not axes:
      return local(zimg_BxD, ztxt_BxD, scale, bias, extras, ())
    shards = mesh_lib.num_batch_shards(mesh)
    if batch % shards:
      raise ValueError(f'Global batch {batch} does not divide over {shards} batch shards '
                       f'(mesh axes {axes}).')
    # The P(axes) for `extras` is a prefix spec: every array in the dict is split by rows.
    sharded = jax.shard_map(
        functools.partial(local, axis_names=axes), mesh=mesh,
        in_specs=(P(axes), P(axes), P(), P(), P(axes)), out_specs=P())
    return sharded(zimg_BxD, ztxt_BxD, scale, bias, extras)

  return fn


def contrastive_loss(zimg, ztxt, *, name: str, impl: str = 'gather', mesh: Mesh, scale,
                     bias=None, extras=None, chunk: int = 1024, **options):
  """The loss `name` of global embeddings `zimg`, `ztxt` ([B, D]) computed by `impl`."""
  return make_loss_fn(name, impl, mesh, chunk=chunk, **options)(
      zimg, ztxt, scale, bias, extras=extras)
