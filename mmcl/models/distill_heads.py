"""Projection heads and the mask token of self-distillation (SILC / TIPS), used in training
only: their parameters sit beside the model's under params['self_distill'].

The head is DINO's (Caron et al. 2021): an MLP (GELU) to a bottleneck, L2-normalised, then
a bias-free linear layer to K prototypes whose weight columns are normalised (weight
normalisation with the gain fixed at 1). DINO's sizes: hidden 2048, bottleneck 256,
K 65,536. One head for the pooled image representation, one for the patch tokens (iBOT
found a shared head works too; separate keeps the two terms apart for ablations).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp

from mmcl.models import two_towers


class DinoHead(nn.Module):
  hidden: int = 2048
  bottleneck: int = 256
  prototypes: int = 65_536
  layers: int = 3

  @nn.compact
  def __call__(self, x_xD):
    x = x_xD.astype(jnp.float32)
    for i in range(self.layers - 1):
      x = nn.gelu(nn.Dense(self.hidden, name=f'mlp_{i}')(x))
    x = two_towers.l2_normalize(nn.Dense(self.bottleneck, name='bottleneck')(x))
    w_CxK = self.param('prototypes', nn.initializers.lecun_normal(),
                       (self.bottleneck, self.prototypes))
    w_CxK = w_CxK * jax.lax.rsqrt(jnp.maximum(jnp.sum(jnp.square(w_CxK), 0, keepdims=True),
                                              1e-12))
    return x @ w_CxK


class SelfDistillHeads(nn.Module):
  """{'mask_token': [width], 'global_head': DinoHead, 'patch_head': DinoHead}."""
  width: int
  hidden: int = 2048
  bottleneck: int = 256
  prototypes: int = 65_536

  def setup(self):
    # Zeros, as iBOT / DINOv2 initialise their mask token.
    self.mask_token = self.param('mask_token', nn.initializers.zeros, (self.width,))
    head = dict(hidden=self.hidden, bottleneck=self.bottleneck, prototypes=self.prototypes)
    self.global_head = DinoHead(**head)
    self.patch_head = DinoHead(**head)

  def __call__(self, pooled_xD, tokens_xD):
    """For init: both heads once."""
    return self.global_head(pooled_xD), self.patch_head(tokens_xD)

  def project_global(self, x_xD):
    return self.global_head(x_xD)

  def project_patches(self, x_xD):
    return self.patch_head(x_xD)
