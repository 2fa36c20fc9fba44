"""Resampling learned 2-D position embeddings to another patch grid.

A ViT trained at one resolution (or patch size) has a [1, h*w, D] position embedding, row-major
over an h x w grid of patches. To run it at another grid the embedding is resized as an image
with D channels: big_vision's `resample_posemb` does it bilinearly (FlexiViT resizes on the fly,
also bilinearly), open_clip's `resize_pos_embed` bicubically; both keep the class token's row
out of the resize (mmcl keeps a class token's position in `cls` itself, so there is none here).

jax.image.resize uses half-pixel centres and normalised kernels (antialiased when shrinking),
so resizing to the same grid is the identity and a constant field stays constant
(tests/test_resolution.py).
"""
import math

import jax
import jax.numpy as jnp
import numpy as np

METHODS = ('bilinear', 'bicubic')
# Image position-embedding names: TwoTowers' ViT ('img/pos_embedding') and LIMoE's.
IMAGE_POSEMB = ('img/pos_embedding', 'img_pos_embedding')
TEXT_POSEMB = ('txt/pos_embedding', 'txt_pos_embedding')


def square_grid(num_tokens: int, what: str = 'position embedding') -> tuple[int, int]:
  """(g, g) for num_tokens = g * g, else a ValueError saying why nothing can be resampled."""
  g = math.isqrt(num_tokens)
  if g * g != num_tokens:
    raise ValueError(f'{what} has {num_tokens} positions, not a square grid: its grid shape '
                     'is unknown, so it cannot be resampled (give the grid explicitly).')
  return g, g


def as_grid(grid) -> tuple[int, int]:
  """An int g -> (g, g); a pair stays a pair."""
  if isinstance(grid, int):
    return grid, grid
  h, w = grid
  return int(h), int(w)


def resample(pos_1xNxD, new_grid, old_grid=None, method: str = 'bilinear'):
  """pos [1, h*w, D] over an h x w grid -> [1, H*W, D] over `new_grid` (H, W).

  `old_grid` defaults to the square grid of N. Computed in float32; returns the input's dtype
  (numpy in, numpy out: converters and model_init resample on the host).
  """
  if method not in METHODS:
    raise ValueError(f'Unknown posemb resampling method {method!r}; valid: {METHODS}')
  _, n, d = pos_1xNxD.shape
  h, w = as_grid(old_grid) if old_grid is not None else square_grid(n)
  if h * w != n:
    raise ValueError(f'position embedding has {n} positions, not the {h}x{w} grid given.')
  nh, nw = as_grid(new_grid)
  host = isinstance(pos_1xNxD, np.ndarray)
  grid_hxwxD = jnp.asarray(pos_1xNxD, jnp.float32).reshape(h, w, d)
  out = jax.image.resize(grid_hxwxD, (nh, nw, d), method=method).reshape(1, nh * nw, d)
  return np.asarray(out, pos_1xNxD.dtype) if host else out.astype(pos_1xNxD.dtype)


def fit_to(name: str, loaded_1xNxD, want_shape, method: str = 'bilinear'):
  """A loaded position embedding `name` resampled to `want_shape`, or a ValueError with the
  reason it cannot be (a text embedding of another length, another width, a non-square grid)."""
  got = tuple(loaded_1xNxD.shape)
  want = tuple(want_shape)
  if name not in IMAGE_POSEMB:
    why = ('a 1-D text position embedding of another length is not resampled (a text tower '
           'trained on L tokens has learned nothing about position L + 1)'
           if name in TEXT_POSEMB else 'not an image position embedding')
    raise ValueError(f'{name}: shape {got} != the model\'s {want}: {why}.')
  if len(got) != 3 or len(want) != 3 or got[0] != 1 or want[0] != 1:
    raise ValueError(f'{name}: shapes {got} -> {want} are not [1, grid, width].')
  if got[2] != want[2]:
    raise ValueError(f'{name}: width {got[2]} != the model\'s {want[2]}: another model size, '
                     'not another resolution.')
  new_grid = square_grid(want[1], f'{name} (model)')
  old_grid = square_grid(got[1], f'{name} (loaded)')
  return resample(np.asarray(loaded_1xNxD), new_grid, old_grid, method)


def to_image_size(params: dict, patch_size: int, image_size: int, method: str = 'bilinear'):
  """Converted two-tower params with 'img/pos_embedding' resampled for `image_size` pixels
  (the grid image_size // patch_size); a new dict, the other leaves shared."""
  if image_size % patch_size:
    raise ValueError(f'image_size={image_size} is not a multiple of the patch size '
                     f'{patch_size}: no whole patch grid to resample the position embedding to.')
  g = image_size // patch_size
  img = dict(params['img'])
  img['pos_embedding'] = resample(np.asarray(img['pos_embedding']), (g, g), method=method)
  return {**params, 'img': img}
