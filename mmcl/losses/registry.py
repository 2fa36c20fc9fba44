"""The loss registry and the context a loss function receives.

A loss is a function `fn(zimg_bxD, ztxt_bxD, ctx, **kwargs) -> (loss, metrics)` of the
device-local embedding rows. It returns the loss of the GLOBAL batch (reduced across the
batch axes with `ctx.psum`), so its result is replicated on every device. The same
function serves every distribution strategy: with `impl='global'` it runs on the whole
batch outside `shard_map` and every collective in `ctx` is the identity.

Per-row inputs other than the embeddings (group labels, a frozen tower's embeddings, a
third modality) reach a loss as `ctx.extras`: arrays with a leading batch dimension,
sharded like the embeddings, so `ctx.all_gather` gives their global rows.

Adding a loss: write `mmcl/losses/my_loss.py` with a function decorated by
`@register_loss('my_loss')` (the package imports every module in it) and set
`config.loss.name = 'my_loss'`. docs/losses.md walks through an example.
"""
from collections.abc import Callable
import dataclasses

import jax
import jax.numpy as jnp

IMPLS = ('global', 'gather', 'ring')
# Every loss computes its logits at full float32 matmul precision: TPUs round a default-
# precision matmul's inputs to bf16, which with a logit scale of 100 moves logits by up to
# ~0.06 (mean 0.008; tools/bench_precision.py, BENCHMARKS.md section 5), at ~1% of a step. A loss need not ask for it: the driver traces it under this.
PRECISION = 'highest'


def loss_precision(fn: Callable) -> Callable:
  """`fn` traced with every matmul at `PRECISION` (also backward passes traced later)."""
  def wrapped(*args, **kwargs):
    with jax.default_matmul_precision(PRECISION):
      return fn(*args, **kwargs)
  return wrapped


@dataclasses.dataclass(frozen=True)
class LossSpec:
  fn: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
  impls: tuple[str, ...]
  needs_bias: bool = False


_LOSSES: dict[str, LossSpec] = {}


def register_loss(name: str, *, impls=('global', 'gather'), needs_bias: bool = False):
  """Decorator: registers `fn` under `name`, supporting the listed distribution impls."""
  for impl in impls:
    if impl not in IMPLS:
      raise ValueError(f'Unknown loss impl {impl!r} for {name!r}; valid: {IMPLS}')

  def decorator(fn):
    if name in _LOSSES:
      raise ValueError(f'Loss {name!r} is registered twice.')
    _LOSSES[name] = LossSpec(fn, tuple(impls), needs_bias)
    return fn

  return decorator


def get_loss(name: str, impl: str = 'gather') -> LossSpec:
  if name not in _LOSSES:
    raise ValueError(f'Unknown loss {name!r}; valid: {sorted(_LOSSES)}')
  spec = _LOSSES[name]
  if impl not in IMPLS:
    raise ValueError(f'Unknown loss impl {impl!r}; valid: {IMPLS}')
  if impl not in spec.impls:
    raise ValueError(f'Loss {name!r} has no impl {impl!r}; valid: {spec.impls}')
  return spec


def registered_losses() -> list[str]:
  return sorted(_LOSSES)


@dataclasses.dataclass(frozen=True)
class LossContext:
  """What a loss needs besides its embeddings: temperature, bias and collectives.

  `axis_names` are the mesh axes the batch is sharded over (empty for `impl='global'`).
  All collectives below are exact identities when `axis_names` is empty. `extras` holds
  this device's rows of the per-row arrays passed to `make_loss_fn`'s `extras=`.
  """
  scale: jax.Array
  bias: jax.Array | None = None
  axis_names: tuple[str, ...] = ()
  impl: str = 'global'
  chunk: int = 1024  # Ring impl: tile side (rows and columns) within a device.
  extras: dict[str, jax.Array] = dataclasses.field(default_factory=dict)

  @property
  def num_shards(self) -> int:
    return jax.lax.axis_size(self.axis_names) if self.axis_names else 1

  def shard_index(self) -> jax.Array:
    return jax.lax.axis_index(self.axis_names) if self.axis_names else jnp.int32(0)

  def all_gather(self, x: jax.Array) -> jax.Array:
    """Concatenates every shard's rows in shard order; gradients flow back (psum_scatter)."""
    if not self.axis_names:
      return x
    return jax.lax.all_gather(x, self.axis_names, axis=0, tiled=True)

  def extra(self, key: str, loss_name: str) -> jax.Array:
    """`extras[key]`, or a clear error naming the loss that needs it."""
    if key not in self.extras:
      raise ValueError(f'The {loss_name!r} loss needs extras[{key!r}] (per-row arrays passed '
                       f'as `loss_fn(..., extras={{...}})`); got keys {sorted(self.extras)}.')
    return self.extras[key]

  def psum(self, x):
    return jax.lax.psum(x, self.axis_names) if self.axis_names else x

  def global_rows(self, local_rows: int) -> tuple[jax.Array, int]:
    """(offset of this shard's first row in the global batch, global batch size)."""
    return self.shard_index() * local_rows, local_rows * self.num_shards
