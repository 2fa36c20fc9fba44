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
import functools
import math

import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def _hard_negative_rows(logits_bxB: jax.Array, is_pos_bxB: jax.Array,
                        beta: float) -> jax.Array:
  """Sum over local rows of log(weighted denominator) - positive logit."""
  batch = logits_bxB.shape[1]
  positives_b = jnp.sum(jnp.where(is_pos_bxB, logits_bxB, 0.0), axis=1)
  # log w_ij = log(B - 1) + beta l_ij - logsumexp_{k != i} beta l_ik, kept in log space so
  # the weighted denominator is one logsumexp over [l_ii, l_ij + log w_ij].
  beta_neg_bxB = jnp.where(is_pos_bxB, -jnp.inf, beta * logits_bxB)
  log_w_bxB = (math.log(batch - 1) + beta_neg_bxB
               - jax.nn.logsumexp(beta_neg_bxB, axis=1, keepdims=True))
  weighted_bxB = jnp.where(is_pos_bxB, logits_bxB, logits_bxB + log_w_bxB)
  return jnp.sum(jax.nn.logsumexp(weighted_bxB, axis=1) - positives_b)


@register_loss('hard_negative', impls=('global', 'gather'))
def hard_negative_loss(zimg_bxD, ztxt_bxD, ctx: LossContext, beta: float = 0.5):
  row_fn = functools.partial(_hard_negative_rows, beta=beta)
  return rows.symmetric_row_loss(zimg_bxD, ztxt_bxD, ctx, row_fn)
