"""NaFlex building blocks (SigLIP 2, Tschannen et al. 2025): images at their own aspect ratio.

An image is resized so that its patch grid (h_i, w_i) fits a sequence budget L, patchified into
h_i * w_i tokens, and padded to L; `valid_BxL` marks the real tokens, `rows_BxL` / `cols_BxL`
their grid positions. The pieces here make the padded batch compute what each image alone would:
attention only to valid keys, pooling only over valid tokens, and each image's position
embedding resampled to its own grid (big_vision's NaFlex ViT resamples the learned embedding
per image the same way). The ViT's NaFlex mode (mmcl/models/vit.py) uses them; the input
comes from the pp op `patchify_naflex` (mmcl/data/pp_naflex.py); docs/resolution.md.
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models import posemb as posemb_lib
from mmcl.models import transformer

# The patch dict's keys besides 'image' (the patches [B, L, p*p*3]): the batch keys the pp op
# patchify_naflex writes (mmcl/data/pp_naflex.py, which cannot import models; a test checks
# they agree).
ROWS, COLS, MASK, GRID = 'patch_rows', 'patch_cols', 'patch_mask', 'patch_grid'
KEYS = (ROWS, COLS, MASK, GRID)


def patch_dict(batch: dict):
  """The model's image input of a batch: its patch dict under NaFlex, else batch['image']."""
  if MASK not in batch:
    return batch['image']
  return {k: batch[k] for k in ('image', *KEYS)}


class PatchDense(nn.Module):
  """The ViT's patch embedding on flattened patches [..., p*p*C]: nn.Conv's parameters
  ('kernel' [p, p, C, D], 'bias' [D], same initialisers) applied as one matmul, so the
  NaFlex mode and the conv read the same checkpoint."""
  width: int
  patch_size: int
  channels: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxP):
    p, c = self.patch_size, self.channels
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c, self.width),
                        transformer.PARAM_DTYPE)
    bias = self.param('bias', nn.initializers.zeros_init(), (self.width,),
                      transformer.PARAM_DTYPE)
    kernel_PxD = kernel.reshape(p * p * c, self.width).astype(self.dtype)
    return (jnp.einsum('blp,pd->bld', x_BxLxP.astype(self.dtype), kernel_PxD) +
            bias.astype(self.dtype)[None, None, :])


def attention_mask(valid_BxL):
  """[B, 1, L, L] bool for transformer.Encoder: every query attends to the valid keys only."""
  return jnp.broadcast_to(valid_BxL[:, None, None, :],
                          (valid_BxL.shape[0], 1, valid_BxL.shape[1], valid_BxL.shape[1]))


def masked_mean(x_BxLxD, valid_BxL):
  """Mean over each row's valid tokens (GAP without the padding)."""
  w_BxL = valid_BxL.astype(x_BxLxD.dtype)
  total_BxD = jnp.einsum('bld,bl->bd', x_BxLxD, w_BxL)
  return total_BxD / jnp.maximum(jnp.sum(w_BxL, axis=1, keepdims=True), 1)


def posemb_per_image(pos_1xNxD, grid_Bx2, rows_BxL, cols_BxL, max_grid, old_grid=None,
                     method: str = 'bilinear'):
  """[B, L, D]: token (r, c) of image b gets the embedding resampled to b's own (h_b, w_b) grid.

  The resize to a traced (h_b, w_b) is jax.image.scale_and_translate with scale
  (h_b / g_h, w_b / g_w) to the static `max_grid`, the computation jax.image.resize does for
  a static size. It is separable, so it runs on identity matrices: per image a [max_h, g_h]
  row and a [max_w, g_w] column weight matrix, and each token contracts its row of each with
  the stored grid (memory O(B L g), not O(B max_h max_w D): max_grid may be (L, L)).
  Padding tokens (any row/col) read some embedding: they are masked out downstream.
  """
  if method not in posemb_lib.METHODS:
    raise ValueError(f'Unknown posemb resampling method {method!r}; valid: {posemb_lib.METHODS}')
  _, n, d = pos_1xNxD.shape
  gh, gw = (posemb_lib.as_grid(old_grid) if old_grid is not None
            else posemb_lib.square_grid(n))
  mh, mw = posemb_lib.as_grid(max_grid)
  grid_hxwxD = pos_1xNxD.reshape(gh, gw, d).astype(jnp.float32)

  def weights(size, g, m):  # [m, g]: output position x stored position, for a traced size.
    return jax.image.scale_and_translate(
        jnp.eye(g, dtype=jnp.float32), (m, g), (0,), (size / g)[None],
        jnp.zeros((1,), jnp.float32), method)

  def one(hw_2, rows_L, cols_L):
    hw_2 = hw_2.astype(jnp.float32)
    wr_Lxh = weights(hw_2[0], gh, mh)[jnp.clip(rows_L, 0, mh - 1)]
    wc_Lxw = weights(hw_2[1], gw, mw)[jnp.clip(cols_L, 0, mw - 1)]
    return jnp.einsum('li,lj,ijd->ld', wr_Lxh, wc_Lxw, grid_hxwxD,
                      precision=jax.lax.Precision.HIGHEST)

  return jax.vmap(one)(grid_Bx2, rows_BxL, cols_BxL).astype(pos_1xNxD.dtype)
