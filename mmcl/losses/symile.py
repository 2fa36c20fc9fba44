"""Symile: contrastive learning of three modalities with the multilinear inner product.

Saporta, Puli, Goldstein and Ranganath 2024, "Contrasting with Symile: Simple
Model-Agnostic Representation Learning for Unlimited Modalities" (NeurIPS). The score of a
triple is the multilinear inner product MIP(a, b, c) = sum_d a_d b_d c_d, and the loss, a
lower bound on total correlation, is one InfoNCE term per modality, averaged:
  L_a = mean_i -log [ exp(t MIP(a_i, b_i, c_i)) / sum_j exp(t MIP(a_j, b_i, c_i)) ],
and L_b, L_c likewise (replace b, resp. c, by every row of the batch), L = (L_a+L_b+L_c)/3,
with a = zimg, b = ztxt and c = `ctx.extras['zthird']` ([b, D], trained like the others).

Negative sampling: the O(N) variant (N candidates per positive, an N x N logit block per
term; the paper's O(N^2) variant scores all N^2 combinations of the two other modalities).
The candidates of term m are the batch rows of modality m, the two others fixed to the
positive row, as written above. This is deterministic: the reference code's O(N) variant
instead fixes modality m and pairs it with independently shuffled rows of the two others,
which needs a random permutation each step. Both terms are InfoNCE bounds whose optimal
score is the pointwise total correlation up to a function of the fixed modalities, which
the softmax ignores.
"""
import jax
import jax.numpy as jnp

from mmcl.losses.registry import LossContext, register_loss


def _infonce_rows(logits_bxB: jax.Array, offset) -> jax.Array:
  """Sum over local rows r of -log softmax(logits[r])[offset + r]."""
  b = logits_bxB.shape[0]
  log_p_b = jnp.take_along_axis(jax.nn.log_softmax(logits_bxB, axis=1),
                                (offset + jnp.arange(b))[:, None], axis=1)[:, 0]
  return -jnp.sum(log_p_b)


@register_loss('symile', impls=('global', 'gather'))
def symile_loss(zimg_bxD, ztxt_bxD, ctx: LossContext):
  zthird_bxD = ctx.extra('zthird', 'symile')
  b = zimg_bxD.shape[0]
  offset, batch = ctx.global_rows(b)
  modalities = (zimg_bxD, ztxt_bxD, zthird_bxD)
  terms = []
  for m, candidates_bxD in enumerate(modalities):
    # MIP(candidate_j, fixed_i, fixed'_i) = candidate_j . (fixed_i * fixed'_i).
    fixed_a_bxD, fixed_b_bxD = (z for k, z in enumerate(modalities) if k != m)
    logits_bxB = ctx.scale * (fixed_a_bxD * fixed_b_bxD) @ ctx.all_gather(candidates_bxD).T
    terms.append(ctx.psum(_infonce_rows(logits_bxB, offset)) / batch)
  loss_img, loss_txt, loss_third = terms
  return (loss_img + loss_txt + loss_third) / 3, {
      'loss_img': loss_img, 'loss_txt': loss_txt, 'loss_third': loss_third}
