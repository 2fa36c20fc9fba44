"""AUC loss: a pairwise logistic (Mann-Whitney) surrogate over score differences.

"Optimizing What Matters: AUC-Driven Learning for Robust Neural Retrieval" (2025):
retrieval is trained by "minimizing binary cross entropy over score differences", a
smooth surrogate of 1 - AUC that ranks every positive above every negative of its query:
  L^{i2t} = mean_i mean_{j != i} log(1 + exp(-t (s_ii - s_ij))),   s_ij = x_i . y_j,
  L^{t2i} = mean_j mean_{i != j} log(1 + exp(-t (s_jj - s_ij))),
  L = (L^{i2t} + L^{t2i}) / 2.
The loss depends only on score differences, so a bias would cancel; none is used.

With `impl='gather'` each device holds two b x B difference blocks; `impl='ring'` sums
them tile by tile (memory O(b)).
"""
import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def _pairwise_logistic(logits_rxc, is_pos_rxc, pos_rx1):
  """Per row: sum over negatives j of softplus(l_rj - l_r,pos) = log(1 + exp(-(pos - neg)))."""
  terms_rxc = jax.nn.softplus(logits_rxc - pos_rx1)
  return {'sum': jnp.sum(jnp.where(is_pos_rxc, 0.0, terms_rxc), axis=1)}


AUC = rows.RowLoss(stats=_pairwise_logistic, kinds={'sum': 'sum'},
                   finish=lambda pos_r, s: s['sum'])


@register_loss('auc', impls=('global', 'gather', 'ring'))
def auc_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  _, batch = ctx.global_rows(zimg_bxD.shape[0])
  return rows.row_stats_loss(zimg_bxD, ztxt_bxD, ctx, AUC, pairs_per_row=batch - 1)
