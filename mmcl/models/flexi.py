"""FlexiViT: one patch-embedding kernel for every patch size, by PI-resize.

Beyer et al. 2023, "FlexiViT: One Model for All Patch Sizes". A patch x (p x p) resized
bilinearly to q x q is B x, with B the [q*q, p*p] matrix of the resize. The kernel w of size p
is replaced by w_hat = pinv(B^T) w ("PI-resize"), which solves
    <x, w> = <B x, w_hat>  for every x        when q >= p (B^T B is invertible: exact),
and in the least-squares sense when q < p (exact only for patches that are resizes of a
q x q patch, close for smooth ones). FlexiViT stores the kernel at 32 x 32 and the position
embedding at 7 x 7 and resizes both on the fly to the patch size sampled for the step; mmcl
stores them at the ViT's `patch_size` and `posemb_grid` (mmcl/models/vit.py).
"""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmcl.models import transformer


def _resize_1d(old: int, new: int) -> np.ndarray:
  """[new, old] float64: jax.image.resize's 'bilinear' without antialias along one axis
  (half-pixel centres, a triangle kernel of radius 1, weights renormalised at the borders)."""
  x_new = (np.arange(new) + 0.5) * old / new - 0.5
  w = np.maximum(0.0, 1.0 - np.abs(x_new[:, None] - np.arange(old)[None, :]))
  return w / w.sum(axis=1, keepdims=True)


@functools.lru_cache(maxsize=None)
def resize_matrix(old: int, new: int) -> np.ndarray:
  """[new*new, old*old] float64: B, the bilinear resize (no antialias, as FlexiViT's
  PI-resize) of a row-major old x old patch; separable, so kron of the 1-D matrices."""
  r = _resize_1d(old, new)
  return np.kron(r, r)


@functools.lru_cache(maxsize=None)
def pi_matrix(old: int, new: int) -> np.ndarray:
  """[new*new, old*old]: pinv(B^T), the map w -> w_hat of the PI-resize."""
  return np.linalg.pinv(resize_matrix(old, new).T)


def pi_resize(kernel_PxPxCxD, new: int):
  """A [p, p, C, D] conv kernel -> [new, new, C, D], PI-resized (see the module docstring)."""
  p, p2, c, d = kernel_PxPxCxD.shape
  if p != p2:
    raise ValueError(f'PI-resize takes square kernels, got {kernel_PxPxCxD.shape}.')
  if new == p:
    return kernel_PxPxCxD
  dt = jnp.promote_types(kernel_PxPxCxD.dtype, jnp.float32)  # float64 under enable_x64.
  m = jnp.asarray(pi_matrix(p, new), dt)
  flat = kernel_PxPxCxD.reshape(p * p, c * d).astype(dt)
  return jnp.dot(m, flat, precision=jax.lax.Precision.HIGHEST).reshape(
      new, new, c, d).astype(kernel_PxPxCxD.dtype)


def resize_image(x_BxPxPxC, new: int):
  """The bilinear patch resize that B stands for (no antialias): tests use it as B x."""
  b, _, _, c = x_BxPxPxC.shape
  return jax.image.resize(x_BxPxPxC, (b, new, new, c), 'bilinear', antialias=False)


class FlexiPatchEmbed(nn.Module):
  """nn.Conv(width, (p, p), strides=p)'s parameters ('kernel' [p, p, 3, D], 'bias' [D], the same
  initialisers), applied with patches of `apply_patch_size` through the PI-resized kernel."""
  width: int
  patch_size: int
  apply_patch_size: int
  dtype: transformer.Dtype = jnp.float32

  @nn.compact
  def __call__(self, image_BxHxWxC):
    p, q = self.patch_size, self.apply_patch_size
    c = image_BxHxWxC.shape[-1]
    kernel = self.param('kernel', nn.initializers.lecun_normal(), (p, p, c, self.width),
                        transformer.PARAM_DTYPE)
    bias = self.param('bias', nn.initializers.zeros, (self.width,), transformer.PARAM_DTYPE)
    kernel_QxQxCxD = pi_resize(kernel, q).astype(self.dtype)
    y = jax.lax.conv_general_dilated(
        image_BxHxWxC.astype(self.dtype), kernel_QxQxCxD, (q, q), 'VALID',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
    return y + bias.astype(self.dtype).reshape(1, 1, 1, -1)
