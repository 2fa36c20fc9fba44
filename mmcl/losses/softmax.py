"""Softmax contrastive loss (CLIP / ALIGN): symmetric InfoNCE.

Radford et al. 2021, "Learning Transferable Visual Models From Natural Language
Supervision"; Jia et al. 2021, "Scaling Up Visual and Vision-Language Representation
Learning With Noisy Text Supervision":
  L = 1/2 [ mean_i CE(t * s_i., i) + mean_j CE(t * s_.j, j) ],  s_ij = x_i . y_j.

With `impl='gather'` each device scores its b local rows against all B gathered columns
in both directions, so it holds two b x B logit blocks; memory grows as b x B. With
`impl='ring'` the row's log-sum-exp is folded tile by tile (ring.py): memory O(b).
"""
import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def soft_target_rows(logits_bxB: jax.Array, weights_bxB: jax.Array) -> jax.Array:
  """Sum over local rows of the weight-averaged -log softmax(row): several or soft targets."""
  log_p_bxB = jax.nn.log_softmax(logits_bxB, axis=1)
  return -jnp.sum(jnp.sum(weights_bxB * log_p_bxB, axis=1) / jnp.sum(weights_bxB, axis=1))


def lse_stats(logits_rxc, is_pos_rxc, pos_rx1):
  del is_pos_rxc, pos_rx1
  return {'lse': jax.nn.logsumexp(logits_rxc, axis=1)}


SOFTMAX = rows.RowLoss(stats=lse_stats, kinds={'lse': 'lse'},
                       finish=lambda pos_r, s: s['lse'] - pos_r)


@register_loss('softmax', impls=('global', 'gather', 'ring'))
def softmax_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  return rows.row_stats_loss(zimg_bxD, ztxt_bxD, ctx, SOFTMAX)
