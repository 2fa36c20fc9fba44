"""Continuously weighted contrastive loss (CWCL): soft targets from a frozen tower.

Srinivasa et al. 2023, "CWCL: Cross-Modal Transfer with Continuously Weighted Contrastive
Loss" (NeurIPS): instead of 0/1 targets, every pair is pulled together in proportion to a
"continuous measure of similarity" computed from a frozen, pre-trained tower's embeddings u:
  w_ij = (1 + cos(u_i, u_j)) / 2 in [0, 1],   p_ik = softmax_k(t s_ik),   s_ik = x_i . y_k,
  L_i^{i2t} = -(1 / sum_j w_ij) sum_j w_ij log p_ij.
The frozen rows come in `ctx.extras['frozen']` ([b, D'], any D'; normalised here) and are
constants (stop_gradient). The paper takes u from the frozen modality of the pair; here u
is one array and the same (symmetric) w also weights the text -> image direction:
  L_j^{t2i} = -(1 / sum_i w_ji) sum_i w_ji log softmax_k(t s_kj)_i,
  L = (mean L^{i2t} + mean L^{t2i}) / 2.
With `impl='gather'` the frozen rows are gathered too, for the b x B weight block.
"""
import jax
import jax.numpy as jnp

from mmcl.losses import rows, softmax
from mmcl.losses.registry import LossContext, register_loss


@register_loss('cwcl', impls=('global', 'gather'))
def cwcl_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  frozen_bxE = jax.lax.stop_gradient(ctx.extra('frozen', 'cwcl'))
  unit_bxE = frozen_bxE / jnp.linalg.norm(frozen_bxE, axis=1, keepdims=True)
  weights_bxB = (1 + unit_bxE @ ctx.all_gather(unit_bxE).T) / 2
  return rows.symmetric_row_loss(zimg_bxD, ztxt_bxD, ctx, softmax.soft_target_rows,
                                 targets_bxB=weights_bxB)
