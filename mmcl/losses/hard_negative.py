"""Hard-negative InfoNCE (HN-NCE): negatives importance-weighted by their similarity.

Radenovic et al. 2023, "Filtering, Distillation, and Hard Negatives for Vision-Language
Pre-Training" (DiHT, CVPR), with alpha = 1 (the positive enters the denominator as in
InfoNCE):
  L_i^{i2t} = -log [ exp(t s_ii) / (exp(t s_ii) + sum_{j != i} w_ij exp(t s_ij)) ],
  w_ij = (B - 1) exp(beta t s_ij) / sum_{k != i} exp(beta t s_ik),   s_ij = x_i . y_j,
so the weights have mean 1 over the negatives of row i and up-weight the hard ones.
L^{t2i} uses the columns (weights normalised over the negatives of column j), and
L = (mean L^{i2t} + mean L^{t2i}) / 2. As in the paper, the weights use the temperature-
scaled similarity (x^T y / tau = t s) and are part of the loss function: gradients flow
through them (no stop_gradient), exactly as the formula is written. beta = 0 gives all
weights 1, i.e. the softmax (CLIP) loss.
"""
import math

import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def hard_negative_spec(beta: float, batch: int) -> rows.RowLoss:
  """HN-NCE in statistics form. The weighted negative sum of row i is
    sum_{j != i} w_ij exp(l_ij) = (B - 1) exp(A_i - C_i),
    A_i = logsumexp_{j != i} (1 + beta) l_ij,   C_i = logsumexp_{j != i} beta l_ij,
  so the loss is logaddexp(l_ii, log(B - 1) + A_i - C_i) - l_ii: two log-sum-exps a ring
  can fold tile by tile.
  """
  def stats(logits_rxc, is_pos_rxc, pos_rx1):
    del pos_rx1
    def negatives_lse(x_rxc):  # Masked after scaling: beta = 0 must not give 0 * -inf.
      return jax.nn.logsumexp(jnp.where(is_pos_rxc, -jnp.inf, x_rxc), axis=1)
    return {'a': negatives_lse((1 + beta) * logits_rxc), 'c': negatives_lse(beta * logits_rxc)}

  def finish(pos_r, s):
    return jnp.logaddexp(pos_r, math.log(batch - 1) + s['a'] - s['c']) - pos_r

  return rows.RowLoss(stats=stats, kinds={'a': 'lse', 'c': 'lse'}, finish=finish)


@register_loss('hard_negative', impls=('global', 'gather', 'ring'))
def hard_negative_loss(zimg_bxD, ztxt_bxD, ctx: LossContext, beta: float = 0.5):
  _, batch = ctx.global_rows(zimg_bxD.shape[0])
  return rows.row_stats_loss(zimg_bxD, ztxt_bxD, ctx, hard_negative_spec(beta, batch))
