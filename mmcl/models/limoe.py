"""LIMoE: one sparse mixture-of-experts transformer shared by images and texts.

Images are patch-embedded and texts token-embedded, each with its own position embedding;
both then run through the *same* encoder (shared attention, shared experts), in two
separate calls so the two modalities never attend to each other and each has its own
routing groups, capacity and per-modality entropy losses. Each modality has its own pooling
and linear head into the shared contrastive space; temperature/bias as in TwoTowers.
"""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn
import jax.numpy as jnp

from mmcl.models import moe as moe_lib
from mmcl.models import patch_dropout as patch_dropout_lib
from mmcl.models import text as text_lib
from mmcl.models import transformer
from mmcl.models import two_towers
from mmcl.models import vit

IMAGE_POOLS = ('gap', 'map')


class LIMoE(nn.Module):
  """Returns (zimg_BxD, ztxt_BxD, out) like TwoTowers; either input may be None.

  out: 't', ['b'], 'aux_loss' (weighted MoE losses, both modalities), 'metrics'
  ({'moe/layer{i}/{image|text}/{expert<e>|dropped|entropy|..._loss}': scalar}).
  Params: img_embedding, img_pos_embedding, txt_embedding, txt_pos_embedding,
  Transformer (shared), img_head, txt_head, [img_map, txt_map], t, [b].
  """
  variant: str | None = None  # ViT-style 'B/16'; the fields below override it.
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: int | None = None
  moe: Mapping[str, Any] = dataclasses.field(default_factory=dict)  # moe.MoeSpec fields.
  embed_dim: int = 512
  image_pool: str = 'gap'
  text_style: str = 'clip'  # 'clip': causal mask, EOT pool; 'siglip': bidirectional, last.
  text_pool: str | None = None
  vocab_size: int = 32_000
  max_len: int = 64
  temperature_init: float = 10.0
  max_temperature: float | None = None
  bias_init: float | None = None
  dropout: float = 0.0
  patch_dropout: float = 0.0  # FLIP, on the image tokens only (texts are short already).
  remat: bool | str = False  # Or a transformer.REMAT_POLICIES name.
  scan: bool = False  # nn.scan over the blocks: needs every layer sparse (moe.every=1).
  act: str = 'gelu_tanh'  # MLP activation (dense and expert MLPs), transformer.ACTIVATIONS.
  ln_eps: float = transformer.LN_EPS
  dtype: str = 'float32'
  mesh: Any = None  # The device mesh (setup passes it): expert parallelism.

  def __post_init__(self):
    super().__post_init__()
    hp = self.hparams()  # Fail at construction time, not inside jit.
    transformer.check_scan(self.moe, hp['depth'], self.scan)
    transformer.check_act(self.act)
    if self.image_pool not in IMAGE_POOLS:
      raise ValueError(f'Unknown LIMoE image_pool {self.image_pool!r}; valid: {IMAGE_POOLS}')
    if self.text_style not in text_lib.STYLES:
      raise ValueError(f'Unknown LIMoE text_style {self.text_style!r}; '
                       f'valid: {text_lib.STYLES}')
    if self.text_pool is not None and self.text_pool not in text_lib.POOLS:
      raise ValueError(f'Unknown LIMoE text_pool {self.text_pool!r}; '
                       f'valid: {text_lib.POOLS}')
    text_lib.routed_tokens(None, self.moe, self.text_style, self.text_pool)
    two_towers.check_temperature(self.temperature_init, self.max_temperature)
    transformer.canonical_dtype(self.dtype)
    patch_dropout_lib.kept_count(1, self.patch_dropout)  # Range check.

  def hparams(self) -> dict:
    return vit.resolve_hparams(self.variant, self.width, self.depth, self.mlp_dim,
                               self.num_heads, self.patch_size)

  @nn.compact
  def __call__(self, image, text, *, train: bool = False):
    hp = self.hparams()
    dtype = transformer.canonical_dtype(self.dtype)
    d = hp['width']
    encoder = transformer.Encoder(
        depth=hp['depth'], mlp_dim=hp['mlp_dim'], num_heads=hp['num_heads'],
        dropout=self.dropout, remat=self.remat, dtype=dtype, act=self.act, ln_eps=self.ln_eps,
        scan=self.scan, moe=moe_lib.MoeSpec.make(self.moe), mesh=self.mesh, name='Transformer')
    out = {'aux_loss': jnp.zeros((), jnp.float32), 'metrics': {}}

    def add_aux(aux):
      out['aux_loss'] = out['aux_loss'] + aux['loss']
      out['metrics'].update(aux['metrics'])

    zimg_BxD = ztxt_BxD = None
    if image is not None:
      x = vit.embed_patches(self, image, hp['patch_size'], d, dtype, name='img_embedding')
      b, h, w, _ = x.shape
      pos_1xNxD = vit.position_embedding(self, (h, w), d, name='img_pos_embedding')
      x_BxNxD = x.reshape(b, h * w, d) + pos_1xNxD.astype(dtype)
      if train and self.patch_dropout > 0:
        x_BxNxD = patch_dropout_lib.drop_patches(x_BxNxD, self.patch_dropout,
                                                 self.make_rng('dropout'))
      x_BxNxD = nn.Dropout(rate=self.dropout)(x_BxNxD, not train)
      x_BxNxD, aux = encoder(x_BxNxD, deterministic=not train, modality='image')
      add_aux(aux)
      if self.image_pool == 'gap':
        x_BxD = jnp.mean(x_BxNxD, axis=1)
      else:
        x_BxD = transformer.MAPHead(mlp_dim=hp['mlp_dim'], num_heads=hp['num_heads'],
                                    dtype=dtype, name='img_map')(x_BxNxD)
      zimg_BxD = two_towers.l2_normalize(transformer.head(self.embed_dim, name='img_head')(x_BxD))

    if text is not None:
      _, l = text.shape
      x_BxLxD = text_lib.embed_tokens(self, text, self.vocab_size, d, self.max_len, dtype,
                                      name='txt_embedding', pos_name='txt_pos_embedding')
      x_BxLxD = nn.Dropout(rate=self.dropout)(x_BxLxD, not train)
      mask = None
      if self.text_style == 'clip':
        mask = nn.make_causal_mask(jnp.ones((1, l), jnp.bool_), dtype=jnp.bool_)
      x_BxLxD, aux = encoder(
          x_BxLxD, mask, deterministic=not train, modality='text',
          valid_BxL=text_lib.routed_tokens(text, self.moe, self.text_style, self.text_pool))
      add_aux(aux)
      pool = self.text_pool or ('eot' if self.text_style == 'clip' else 'last')
      if pool == 'map':
        x_BxD = transformer.MAPHead(mlp_dim=hp['mlp_dim'], num_heads=hp['num_heads'],
                                    dtype=dtype, name='txt_map')(x_BxLxD)
      else:  # Before, 'argmax' fell through to 'map' here.
        x_BxD = text_lib.pool_tokens(x_BxLxD, text, pool)
      ztxt_BxD = two_towers.l2_normalize(transformer.head(self.embed_dim, name='txt_head')(x_BxD))

    two_towers.logit_scale_and_bias(self, out)
    return zimg_BxD, ztxt_BxD, out
