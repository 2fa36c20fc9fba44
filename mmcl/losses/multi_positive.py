"""Multi-positive (SupCon-style) contrastive loss: every pair sharing a group id is positive.

Khosla et al. 2020, "Supervised Contrastive Learning" (NeurIPS), the L_out form (the
1/|P(i)| average outside the log), applied across modalities:
  P(i) = {j : g_j = g_i},  p_ij = softmax_j(t s_ij),  s_ij = x_i . y_j,
  L_i^{i2t} = -(1/|P(i)|) sum_{p in P(i)} log p_ip,
  L^{t2i} likewise with the softmax over texts' rows (ztxt against all images), and
  L = (mean L^{i2t} + mean L^{t2i}) / 2.
The denominator runs over all B candidates, positives included; P(i) always contains the
paired row i. Group ids come in `ctx.extras['labels']` (int [b], sharded like the
embeddings); with all-distinct ids this is exactly the softmax (CLIP) loss.
"""
import jax.numpy as jnp

from mmcl.losses import rows, softmax
from mmcl.losses.registry import LossContext, register_loss


@register_loss('multi_positive', impls=('global', 'gather'))
def multi_positive_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  labels_b = ctx.extra('labels', 'multi_positive')
  _, batch = ctx.global_rows(zimg_bxD.shape[0])
  # Equal ids are symmetric, so the same mask serves both directions.
  is_pos_bxB = labels_b[:, None] == ctx.all_gather(labels_b)[None, :]
  loss, metrics = rows.symmetric_row_loss(
      zimg_bxD, ztxt_bxD, ctx, softmax.soft_target_rows,
      targets_bxB=is_pos_bxB.astype(zimg_bxD.dtype))
  positives = ctx.psum(jnp.sum(is_pos_bxB)) / batch
  return loss, {**metrics, 'positives_per_row': positives.astype(loss.dtype)}
