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

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def cross_entropy_rows(logits_bxB: jax.Array, is_pos_bxB: jax.Array) -> jax.Array:
  """Sum over local rows of -log softmax(row)[positive]."""
  positives_b = jnp.sum(jnp.where(is_pos_bxB, logits_bxB, 0.0), axis=1)
  return jnp.sum(jax.nn.logsumexp(logits_bxB, axis=1) - positives_b)


def soft_target_rows(logits_bxB: jax.Array, weights_bxB: jax.Array) -> jax.Array:
  """Sum over local rows of the weight-averaged -log softmax(row): several or soft targets."""
  log_p_bxB = jax.nn.log_softmax(logits_bxB, axis=1)
  return -jnp.sum(jnp.sum(weights_bxB * log_p_bxB, axis=1) / jnp.sum(weights_bxB, axis=1))


@register_loss('softmax', impls=('global', 'gather'))
def softmax_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  return rows.symmetric_row_loss(zimg_bxD, ztxt_bxD, ctx, cross_entropy_rows)
