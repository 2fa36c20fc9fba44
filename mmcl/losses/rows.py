"""Shared driver for losses that sum a function of each logit row, in both directions.

softmax, dcl, hard_negative, focal and auc all have the form
  L = 1/2 [ sum_i f(t * x_i . Y^T) + sum_j f(t * y_j . X^T) ] / normaliser
for a row function f of the logits and the position of the positive. Each device scores its
local rows against the gathered columns; this module does that once, so a loss file holds
only its row function (and a ring impl can later replace the gather in one place).
"""
from collections.abc import Callable

import jax
import jax.numpy as jnp

from mmcl.losses.registry import LossContext

# f(logits_bxB, targets_bxB) -> sum over the b local rows; targets default to the positives mask.
RowFn = Callable[[jax.Array, jax.Array], jax.Array]


def positives_mask(ctx: LossContext, local_rows: int) -> jax.Array:
  """[b, B] boolean: local row r's positive is global column offset + r."""
  offset, batch = ctx.global_rows(local_rows)
  return (offset + jnp.arange(local_rows))[:, None] == jnp.arange(batch)[None, :]


def symmetric_row_loss(zimg_bxD, ztxt_bxD, ctx: LossContext, row_fn: RowFn,
                       pairs_per_row: int | None = None, targets_bxB=None):
  """(loss, metrics): the mean of `row_fn` over image rows and over text rows.

  The sums are divided by the global batch, times `pairs_per_row` when the row function
  sums over pairs rather than returning one term per row. `targets_bxB` (default: the
  positives mask) is passed to `row_fn` in both directions, so it must be symmetric in
  the pair (i, j), as shared labels and similarity weights are.
  """
  b = zimg_bxD.shape[0]
  _, batch = ctx.global_rows(b)
  if targets_bxB is None:
    targets_bxB = positives_mask(ctx, b)
  i2t = row_fn(ctx.scale * zimg_bxD @ ctx.all_gather(ztxt_bxD).T, targets_bxB)
  t2i = row_fn(ctx.scale * ztxt_bxD @ ctx.all_gather(zimg_bxD).T, targets_bxB)
  normaliser = batch * (pairs_per_row or 1)
  i2t, t2i = ctx.psum(i2t) / normaliser, ctx.psum(t2i) / normaliser
  return (i2t + t2i) / 2, {'loss_i2t': i2t, 'loss_t2i': t2i}
