"""Shared drivers for losses that reduce each row of the image-text logits.

Two forms:

1. `RowLoss` + `row_stats_loss`: per-row statistics summed over the columns, then a per-row
   finish. softmax, sigmoid, dcl, hard_negative, focal and auc have this form:
     L = sum_i finish(p_i, S_i) / normaliser,   S_i = (+)_j stats(l_ij, [j is i's positive], p_i)
   with l_ij = t x_i . y_j (+ b), p_i the positive logit, and each statistic folded over
   columns by addition ('sum') or log-add-exp ('lse'). One definition then runs every impl:
   'global' and 'gather' take the stats of the whole row at once; 'ring' (ring.py) folds them
   tile by tile while the column blocks travel around the devices.

2. `symmetric_row_loss`: a row function of a whole logit row and per-pair targets (several or
   soft positives: multi_positive, cwcl). These need the full row, so 'global'/'gather' only.
"""
from collections.abc import Callable, Mapping
import dataclasses

import jax
import jax.numpy as jnp

from mmcl.losses import ring
from mmcl.losses.registry import LossContext

KINDS = ('lse', 'sum')


@dataclasses.dataclass(frozen=True, eq=False)
class RowLoss:
  """A row loss in statistics form (see the module docstring).

  stats(logits_rxc, is_pos_rxc, pos_rx1) -> {name: [r]}: one tile's contribution to each
    statistic. It must be well defined on any tile of at least two columns.
  kinds: {name: 'lse' | 'sum'}: how tiles fold into the row's statistic.
  finish(pos_r, stats) -> [r]: each row's loss.
  symmetric: score image rows and text rows (CLIP); False scores each pair once (SigLIP).
  with_bias: the logits include the learned bias `ctx.bias`.
  """
  stats: Callable[[jax.Array, jax.Array, jax.Array], dict[str, jax.Array]]
  kinds: Mapping[str, str]
  finish: Callable[[jax.Array, dict[str, jax.Array]], jax.Array]
  symmetric: bool = True
  with_bias: bool = False

  def __post_init__(self):
    bad = {k: v for k, v in self.kinds.items() if v not in KINDS}
    if bad:
      raise ValueError(f'RowLoss kinds {bad} unknown; valid: {KINDS}')

  def logits(self, q_rxD, k_cxD, scale, bias):
    logits_rxc = scale * (q_rxD @ k_cxD.T)
    return logits_rxc + bias if self.with_bias else logits_rxc


def positive_logits(spec: RowLoss, q_bxD, k_bxD, scale, bias) -> jax.Array:
  """[b] logits of each local row with its own pair (row r of both modalities)."""
  pos_b = scale * jnp.sum(q_bxD * k_bxD, axis=1)
  return pos_b + bias if spec.with_bias else pos_b


def row_stats_loss(zimg_bxD, ztxt_bxD, ctx: LossContext, spec: RowLoss,
                   pairs_per_row: int | None = None):
  """(loss, metrics) of a `RowLoss` under any impl of `ctx`: global, gather or ring.

  Each direction's sum over the global rows is divided by the global batch, times
  `pairs_per_row` for losses that sum over pairs; symmetric losses average the directions.
  """
  b = zimg_bxD.shape[0]
  _, batch = ctx.global_rows(b)
  bias = ctx.bias if spec.with_bias else None
  if spec.with_bias and bias is None:
    raise ValueError('This loss needs a learned bias: set config.model.bias_init '
                     '(SigLIP uses -10.0).')
  directions = {'i2t': (zimg_bxD, ztxt_bxD)}
  if spec.symmetric:
    directions['t2i'] = (ztxt_bxD, zimg_bxD)
  pos_b = positive_logits(spec, zimg_bxD, ztxt_bxD, ctx.scale, bias)  # Same both ways.
  if ctx.impl == 'ring':  # One pass of the ring gives both directions.
    stats = dict(zip(('i2t', 't2i'), ring.ring_stats(
        spec, zimg_bxD, ztxt_bxD, ctx.scale, bias, pos_b, axis_names=ctx.axis_names,
        chunk=ctx.chunk)))
  else:
    is_pos_bxB = positives_mask(ctx, b)
    stats = {name: spec.stats(spec.logits(q_bxD, ctx.all_gather(k_bxD), ctx.scale, bias),
                              is_pos_bxB, pos_b[:, None])
             for name, (q_bxD, k_bxD) in directions.items()}
  normaliser = batch * (pairs_per_row or 1)
  metrics = {f'loss_{name}': ctx.psum(jnp.sum(spec.finish(pos_b, stats[name]))) / normaliser
             for name in directions}
  metrics['pos_logit_mean'] = ctx.psum(jnp.sum(pos_b)) / batch
  loss = sum(metrics[f'loss_{n}'] for n in directions) / len(directions)
  return loss, metrics


# f(logits_bxB, targets_bxB) -> sum over the b local rows.
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
