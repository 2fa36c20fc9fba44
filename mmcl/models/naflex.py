"""NaFlex building blocks (SigLIP 2, Tschannen et al. 2025): images at their own aspect ratio.

An image is resized so that its patch grid (h_i, w_i) fits a sequence budget L, patchified into
h_i * w_i tokens, and padded to L; `valid_BxL` marks the real tokens, `rows_BxL` / `cols_BxL`
their grid positions. The pieces here make the padded batch compute what each image alone would:
attention only to valid keys, pooling only over valid tokens, and each image's position
embedding resampled to its own grid (big_vision's NaFlex ViT resamples the learned embedding
per image the same way). Not yet wired into ViT or the input pipeline: docs/resolution.md.
"""
import jax
import jax.numpy as jnp

from mmcl.models import posemb as posemb_lib


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

  The resize to a traced (h_b, w_b) is jax.image.scale_and_translate to the static `max_grid`
  with scale (h_b / g_h, w_b / g_w), the computation jax.image.resize does for a static size;
  the tokens then gather their (row, col). Padding tokens (any row/col) read some embedding:
  they are masked out downstream.
  """
  if method not in posemb_lib.METHODS:
    raise ValueError(f'Unknown posemb resampling method {method!r}; valid: {posemb_lib.METHODS}')
  _, n, d = pos_1xNxD.shape
  gh, gw = (posemb_lib.as_grid(old_grid) if old_grid is not None
            else posemb_lib.square_grid(n))
  mh, mw = posemb_lib.as_grid(max_grid)
  grid_hxwxD = pos_1xNxD.reshape(gh, gw, d).astype(jnp.float32)

  def one(hw_2, rows_L, cols_L):
    scale = hw_2.astype(jnp.float32) / jnp.array([gh, gw], jnp.float32)
    out = jax.image.scale_and_translate(grid_hxwxD, (mh, mw, d), (0, 1), scale,
                                        jnp.zeros((2,), jnp.float32), method)
    return out[jnp.clip(rows_L, 0, mh - 1), jnp.clip(cols_L, 0, mw - 1)]

  return jax.vmap(one)(grid_Bx2, rows_BxL, cols_BxL).astype(pos_1xNxD.dtype)
