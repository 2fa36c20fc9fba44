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
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss
from mmcl.losses.softmax import lse_stats


def focal_spec(gamma: float) -> rows.RowLoss:
  def finish(pos_r, s):
    log_p_r = pos_r - s['lse']
    if gamma == 0:  # Skips the power: 0 ** 0 would give a NaN gradient when p == 1.
      return -log_p_r
    # 1 - p = -expm1(log p) keeps precision when p is close to 1.
    return -(-jnp.expm1(log_p_r)) ** gamma * log_p_r

  return rows.RowLoss(stats=lse_stats, kinds={'lse': 'lse'}, finish=finish)


@register_loss('focal', impls=('global', 'gather', 'ring'))
def focal_loss(zimg_bxD, ztxt_bxD, ctx: LossContext, gamma: float = 2.0):
  return rows.row_stats_loss(zimg_bxD, ztxt_bxD, ctx, focal_spec(gamma))
