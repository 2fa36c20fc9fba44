"""AUC loss: a pairwise logistic (Mann-Whitney) surrogate over score differences.

"Optimizing What Matters: AUC-Driven Learning for Robust Neural Retrieval" (2025):
retrieval is trained by "minimizing binary cross entropy over score differences", a
smooth surrogate of 1 - AUC that ranks every positive above every negative of its query:
  L^{i2t} = mean_i mean_{j != i} log(1 + exp(-t (s_ii - s_ij))),   s_ij = x_i . y_j,
  L^{t2i} = mean_j mean_{i != j} log(1 + exp(-t (s_jj - s_ij))),
  L = (L^{i2t} + L^{t2i}) / 2.
The loss depends only on score differences, so a bias would cancel; none is used.

With `impl='gather'` each device holds two b x B difference blocks.
"""
import jax
import jax.numpy as jnp

from mmcl.losses import rows
from mmcl.losses.registry import LossContext, register_loss


def _pairwise_logistic_rows(logits_bxB: jax.Array, is_pos_bxB: jax.Array) -> jax.Array:
  """Sum over local rows r of sum_{j != pos} softplus(logit_rj - logit_r,pos)."""
  positives_bx1 = jnp.sum(jnp.where(is_pos_bxB, logits_bxB, 0.0), axis=1, keepdims=True)
  # softplus(-(pos - neg)) = log(1 + exp(-(pos - neg))), computed without overflow.
  terms_bxB = jax.nn.softplus(logits_bxB - positives_bx1)
  return jnp.sum(jnp.where(is_pos_bxB, 0.0, terms_bxB))


@register_loss('auc', impls=('global', 'gather'))
def auc_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  b = zimg_bxD.shape[0]
  _, batch = ctx.global_rows(b)
  return rows.symmetric_row_loss(zimg_bxD, ztxt_bxD, ctx, _pairwise_logistic_rows,
                                pairs_per_row=batch - 1)
