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

With `impl='gather'` each device holds two b x B logit blocks, as the softmax loss does;
`impl='ring'` folds the negatives' log-sum-exp tile by tile (memory O(b)).
"""
import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def _negatives_lse(logits_rxc, is_pos_rxc, pos_rx1):
  del pos_rx1
  return {'neg': jax.nn.logsumexp(jnp.where(is_pos_rxc, -jnp.inf, logits_rxc), axis=1)}


DCL = rows.RowLoss(stats=_negatives_lse, kinds={'neg': 'lse'},
                   finish=lambda pos_r, s: s['neg'] - pos_r)


@register_loss('dcl', impls=('global', 'gather', 'ring'))
def dcl_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  return rows.row_stats_loss(zimg_bxD, ztxt_bxD, ctx, DCL)
