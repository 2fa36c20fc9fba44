"""Focal image-text contrastive loss: softmax InfoNCE with focal cross entropy.

Kim, Angelova and Kuo 2023, "Region-Aware Pretraining for Open-Vocabulary Object Detection
with Vision Transformers" (RO-ViT, CVPR) replaces the softmax cross entropy of the
contrastive loss with the focal loss of Lin et al. 2017 ("Focal Loss for Dense Object
Detection"), down-weighting pairs that are already well matched:
  p_ij = softmax_j(t s_ij),   L_i^{i2t} = -(1 - p_ii)^gamma log p_ii,
  L^{t2i} likewise with the softmax over the column, L = (mean L^{i2t} + mean L^{t2i}) / 2.
As in Lin et al., the modulating factor (1 - p_ii)^gamma is differentiated through (not a
constant). gamma = 0 is exactly the softmax (CLIP) loss.
"""
import functools

import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def _focal_rows(logits_bxB: jax.Array, is_pos_bxB: jax.Array, gamma: float) -> jax.Array:
  """Sum over local rows of -(1 - p)^gamma log p, p = softmax(row)[positive]."""
  log_p_b = jnp.sum(jnp.where(is_pos_bxB, jax.nn.log_softmax(logits_bxB, axis=1), 0.0), axis=1)
  if gamma == 0:  # Skips the power: 0 ** 0 would give a NaN gradient when p == 1.
    return -jnp.sum(log_p_b)
  # 1 - p = -expm1(log p) keeps precision when p is close to 1.
  return -jnp.sum((-jnp.expm1(log_p_b)) ** gamma * log_p_b)


@register_loss('focal', impls=('global', 'gather'))
def focal_loss(zimg_bxD, ztxt_bxD, ctx: LossContext, gamma: float = 2.0):
  row_fn = functools.partial(_focal_rows, gamma=gamma)
  return rows.symmetric_row_loss(zimg_bxD, ztxt_bxD, ctx, row_fn)
