"""Softmax contrastive loss (CLIP / ALIGN): symmetric InfoNCE.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"; Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation
Learning With Noisy Text Supervision":
  L = 1/2 [ mean_i CE(t * s_i., i) + mean_j CE(t * s_.j, j) ],  s_ij = x_i . y_j.

With `impl='gather'` each device scores its b local rows against all B gathered columns
in both directions, so it holds two b x B logit blocks; memory grows as b x B.
"""
import jax
import jax.numpy as jnp

from mmcl.losses.registry import LossContext, register_loss


def _cross_entropy_rows(logits_bxB: jax.Array, offset) -> jax.Array:
  """Sum over local rows r of -log softmax(logits[r])[offset + r]."""
  b = logits_bxB.shape[0]
  positives_b = jnp.take_along_axis(
      logits_bxB, (offset + jnp.arange(b))[:, None], axis=1)[:, 0]
  return jnp.sum(jax.nn.logsumexp(logits_bxB, axis=1) - positives_b)


@register_loss('softmax', impls=('global', 'gather'))
def softmax_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  b = zimg_bxD.shape[0]
  offset, batch = ctx.global_rows(b)
  ztxt_BxD = ctx.all_gather(ztxt_bxD)
  zimg_BxD = ctx.all_gather(zimg_bxD)
  i2t = _cross_entropy_rows(ctx.scale * zimg_bxD @ ztxt_BxD.T, offset)
  t2i = _cross_entropy_rows(ctx.scale * ztxt_bxD @ zimg_BxD.T, offset)
  i2t, t2i = ctx.psum(i2t) / batch, ctx.psum(t2i) / batch
  return (i2t + t2i) / 2, {'loss_i2t': i2t, 'loss_t2i': t2i}
