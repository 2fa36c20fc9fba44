"""Decoupled contrastive loss (DCL): InfoNCE without the positive in the denominator.

Yeh, Hong, Hsu, Liu, Chen and LeCun 2022, "Decoupled Contrastive Learning" (ECCV): the
positive pair is removed from the InfoNCE denominator, which decouples the positive and
negative gradients (no "negative-positive coupling" factor). For image-text pairs:
  L_i^{i2t} = -t s_ii + log sum_{j != i} exp(t s_ij),   s_ij = x_i . y_j,
  L_j^{t2i} = -t s_jj + log sum_{i != j} exp(t s_ij),
  L = 1/2 [ mean_i L_i^{i2t} + mean_j L_j^{t2i} ].
Negatives are the other modality's rows only (cross-modal, as in CLIP), not the
same-modality rows of the paper's two-view SimCLR setting; the paper's optional
von Mises-Fisher positive weighting (DCLW) is not included.

With `impl='gather'` each device holds two b x B logit blocks, as the softmax loss does.
"""
import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def _decoupled_rows(logits_bxB: jax.Array, is_pos_bxB: jax.Array) -> jax.Array:
  """Sum over local rows of -logit_pos + logsumexp over the row's negatives."""
  positives_b = jnp.sum(jnp.where(is_pos_bxB, logits_bxB, 0.0), axis=1)
  negatives_b = jax.nn.logsumexp(jnp.where(is_pos_bxB, -jnp.inf, logits_bxB), axis=1)
  return jnp.sum(negatives_b - positives_b)


@register_loss('dcl', impls=('global', 'gather'))
def dcl_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  return rows.symmetric_row_loss(zimg_bxD, ztxt_bxD, ctx, _decoupled_rows)
