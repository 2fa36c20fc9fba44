"""Alignment and uniformity on the hypersphere, optionally added to the CLIP loss.

Wang and Isola 2020, "Understanding Contrastive Representation Learning through Alignment
and Uniformity on the Hypersphere" (ICML), with alpha = 2 and t_unif = 2:
  L_align = mean_i ||x_i - y_i||^2,
  L_unif(x) = log mean_{i != j} exp(-2 ||x_i - x_j||^2)   (over the global batch),
for x = image and y = text embeddings. Fahim, Murphy and Fyshe 2024, "It's Not a Modality
Gap: Characterizing and Addressing the Contrastive Gap", add these terms to the CLIP loss:
  L = clip_weight * L_CLIP + align_weight * L_align
      + unif_weight * (L_unif(x) + L_unif(y)) / 2,
with L_CLIP the 'softmax' loss (mmcl/losses/softmax.py). The defaults (clip_weight = 0)
give the pure alignment + uniformity objective.

The embeddings are meant to be unit-norm (as in the paper), so exp(-2 d) <= 1 never
overflows and the global mean is a psum of per-device sums of exponentials.
"""
import jax.numpy as jnp

from mmcl.losses import softmax
from mmcl.losses.registry import LossContext, register_loss


def _uniformity(z_bxD, ctx: LossContext):
  """log mean_{i != j} exp(-2 ||z_i - z_j||^2) over the global batch of z."""
  b = z_bxD.shape[0]
  offset, batch = ctx.global_rows(b)
  z_BxD = ctx.all_gather(z_bxD)
  sq_dist_bxB = (jnp.sum(z_bxD**2, axis=1)[:, None] + jnp.sum(z_BxD**2, axis=1)[None, :]
                 - 2 * z_bxD @ z_BxD.T)
  is_self_bxB = (offset + jnp.arange(b))[:, None] == jnp.arange(batch)[None, :]
  total = ctx.psum(jnp.sum(jnp.where(is_self_bxB, 0.0, jnp.exp(-2 * sq_dist_bxB))))
  return jnp.log(total / (batch * (batch - 1)))


@register_loss('align_uniform', impls=('global', 'gather'))
def align_uniform_loss(zimg_bxD, ztxt_bxD, ctx: LossContext, align_weight: float = 1.0,
                       unif_weight: float = 1.0, clip_weight: float = 0.0):
  _, batch = ctx.global_rows(zimg_bxD.shape[0])
  align = ctx.psum(jnp.sum((zimg_bxD - ztxt_bxD)**2)) / batch
  unif_img, unif_txt = _uniformity(zimg_bxD, ctx), _uniformity(ztxt_bxD, ctx)
  loss = align_weight * align + unif_weight * (unif_img + unif_txt) / 2
  metrics = {'align': align, 'unif_img': unif_img, 'unif_txt': unif_txt}
  if clip_weight:  # Skips the two b x B logit blocks when CLIP is off.
    clip, _ = softmax.softmax_loss(zimg_bxD, ztxt_bxD, ctx)
    loss += clip_weight * clip
    metrics['clip'] = clip
  return loss, metrics
