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
import jax
import jax.numpy as jnp

from mmcl.losses.registry import LossContext, register_loss


def _multi_positive_rows(logits_bxB: jax.Array, is_pos_bxB: jax.Array) -> jax.Array:
  """Sum over local rows of the mean over that row's positives of -log softmax."""
  log_p_bxB = jax.nn.log_softmax(logits_bxB, axis=1)
  num_pos_b = jnp.sum(is_pos_bxB, axis=1)
  return -jnp.sum(jnp.sum(jnp.where(is_pos_bxB, log_p_bxB, 0.0), axis=1) / num_pos_b)


@register_loss('multi_positive', impls=('global', 'gather'))
def multi_positive_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  labels_b = ctx.extra('labels', 'multi_positive')
  _, batch = ctx.global_rows(zimg_bxD.shape[0])
  zimg_BxD = ctx.all_gather(zimg_bxD)
  ztxt_BxD = ctx.all_gather(ztxt_bxD)
  labels_B = ctx.all_gather(labels_b)
  # Equal ids are symmetric, so the same mask serves both directions.
  is_pos_bxB = labels_b[:, None] == labels_B[None, :]
  i2t = _multi_positive_rows(ctx.scale * zimg_bxD @ ztxt_BxD.T, is_pos_bxB)
  t2i = _multi_positive_rows(ctx.scale * ztxt_bxD @ zimg_BxD.T, is_pos_bxB)
  i2t, t2i = ctx.psum(i2t) / batch, ctx.psum(t2i) / batch
  positives = ctx.psum(jnp.sum(is_pos_bxB)) / batch
  return (i2t + t2i) / 2, {'loss_i2t': i2t, 'loss_t2i': t2i,
                           'positives_per_row': positives.astype(i2t.dtype)}
