"""Sigmoid contrastive loss (SigLIP).

Zhai et al. 2023, "Sigmoid Loss for Language Image Pre-Training":
  L = -(1/B) sum_i sum_j log sigmoid(z_ij (t s_ij + b)),  z_ii = +1, z_ij = -1 (i != j).

Every pair is scored once: with `impl='gather'` each device scores its b local images
against all B gathered texts (one b x B block), and the sum over devices covers all pairs.
With `impl='ring'` the text blocks travel around the devices and each tile's sum is added
as it is scored (ring.py): memory O(b).
"""
import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def _pair_terms(logits_rxc, is_pos_rxc, pos_rx1):
  del pos_rx1
  signs_rxc = jnp.where(is_pos_rxc, 1.0, -1.0).astype(logits_rxc.dtype)
  return {'sum': -jnp.sum(jax.nn.log_sigmoid(signs_rxc * logits_rxc), axis=1)}


SIGMOID = rows.RowLoss(stats=_pair_terms, kinds={'sum': 'sum'},
                       finish=lambda pos_r, s: s['sum'], symmetric=False, with_bias=True)


@register_loss('sigmoid', impls=('global', 'gather', 'ring'), needs_bias=SIGMOID.with_bias)
def sigmoid_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  loss, metrics = rows.row_stats_loss(zimg_bxD, ztxt_bxD, ctx, SIGMOID)
  del metrics['loss_i2t']  # The only direction: equal to the loss.
  return loss, metrics
