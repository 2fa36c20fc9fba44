"""Sigmoid contrastive loss (SigLIP).

Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training":
  L = -(1/B) sum_i sum_j log sigmoid(z_ij (t s_ij + b)),  z_ii = +1, z_ij = -1 (i != j).

Every pair is scored once: with `impl='gather'` each device scores its b local images
against all B gathered texts (one b x B block), and the sum over devices covers all pairs.
"""
import jax
import jax.numpy as jnp

from mmcl.losses.registry import LossContext, register_loss


@register_loss('sigmoid', impls=('global', 'gather'), needs_bias=True)
def sigmoid_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  if ctx.bias is None:
    raise ValueError("The 'sigmoid' loss needs a learned bias: set config.model.bias_init "
                     '(SigLIP uses -10.0).')
  b = zimg_bxD.shape[0]
  offset, batch = ctx.global_rows(b)
  ztxt_BxD = ctx.all_gather(ztxt_bxD)
  logits_bxB = ctx.scale * zimg_bxD @ ztxt_BxD.T + ctx.bias
  is_pos_bxB = (offset + jnp.arange(b))[:, None] == jnp.arange(batch)[None, :]
  signs_bxB = jnp.where(is_pos_bxB, 1.0, -1.0).astype(logits_bxB.dtype)
  total = ctx.psum(-jnp.sum(jax.nn.log_sigmoid(signs_bxB * logits_bxB)))
  pos = ctx.psum(jnp.sum(jnp.where(is_pos_bxB, logits_bxB, 0.0)))
  return total / batch, {'pos_logit_mean': pos / batch}
