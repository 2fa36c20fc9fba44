"""Vision Transformer image tower."""
from collections.abc import Mapping
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmcl.models import flexi
from mmcl.models import naflex
from mmcl.models import patch_dropout as patch_dropout_lib
from mmcl.models import posemb as posemb_lib
from mmcl.models import transformer

POOLS = ('tok', 'gap', 'map')


def decode_variant(variant: str | None) -> dict:
  """'B/16' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12,
  patch_size=16). 'B' alone leaves patch_size out; None gives {}."""
  if variant is None:
    return {}
  valid = (f'valid: {", ".join(transformer.VARIANTS)}, written NAME/PATCH '
           "like 'B/16'")
  name, _, patch = str(variant).partition('/')
  if name not in transformer.VARIANTS:
    raise ValueError(f'Unknown ViT variant {variant!r}; {valid}')
  hp = dict(transformer.VARIANTS[name])
  if patch:
    if not patch.isdigit() or int(patch) <= 0:
      raise ValueError(f'Bad patch size in ViT variant {variant!r}; {valid}')
    hp['patch_size'] = int(patch)
  return hp


def resolve_hparams(variant=None, width=None, depth=None, mlp_dim=None,
                    num_heads=None, patch_size=None) -> dict:
  """Variant table entry with the explicit (non-None) fields overriding it."""
  return transformer.merge_hparams(
      'ViT', decode_variant(variant),
      dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads,
           patch_size=patch_size))


def embed_patches(module: nn.Module, image_BxHxWx3, patch_size: int, width: int, dtype,
                  apply_patch_size: int | None = None, name: str = 'embedding'):
  """The patch embedding of `module` (called inside its compact method): [B, h, w, width].
  `apply_patch_size` (FlexiViT) patchifies at another size with the PI-resized kernel."""
  if apply_patch_size is None:
    return nn.Conv(width, (patch_size, patch_size), strides=(patch_size, patch_size),
                   padding='VALID', dtype=dtype, param_dtype=transformer.PARAM_DTYPE,
                   name=name)(image_BxHxWx3.astype(dtype))
  return flexi.FlexiPatchEmbed(width, patch_size, apply_patch_size, dtype=dtype,
                               name=name)(image_BxHxWx3)


def stored_position_embedding(module: nn.Module, hw: tuple[int, int], width: int, grid=None,
                              name: str = 'pos_embedding'):
  """(`module`'s learned position embedding [1, gh*gw, width], its stored grid (gh, gw)).

  Stored at `grid` (g or (h, w)) when given, else at the grid seen at init (`hw`); a stored
  grid must be square unless `grid` gives it or it is `hw`.
  """
  h, w = hw
  if grid is not None:
    gh, gw = posemb_lib.as_grid(grid)
  elif module.has_variable('params', name):  # Apply: the stored grid.
    n = module.get_variable('params', name).shape[1]
    what = f'{type(module).__name__} {name}'
    gh, gw = (h, w) if n == h * w else posemb_lib.square_grid(n, what)
  else:  # Init: this image's grid.
    gh, gw = h, w
  pos_1xNxD = module.param(name, nn.initializers.normal(stddev=1 / math.sqrt(width)),
                           (1, gh * gw, width), transformer.PARAM_DTYPE)
  return pos_1xNxD, (gh, gw)


def position_embedding(module: nn.Module, hw: tuple[int, int], width: int, grid=None,
                       method: str = 'bilinear', name: str = 'pos_embedding'):
  """`module`'s learned position embedding [1, h*w, width] for an (h, w) patch grid.

  Stored at `grid` (g or (h, w)) when given, else at the grid seen at init; another grid
  at apply gets it resampled (mmcl.models.posemb). A stored grid must be square unless
  `grid` gives it.
  """
  pos_1xNxD, stored = stored_position_embedding(module, hw, width, grid, name)
  if stored != tuple(hw):
    pos_1xNxD = posemb_lib.resample(pos_1xNxD, tuple(hw), stored, method)
  return pos_1xNxD


def embed_naflex(module: nn.Module, patches: Mapping, patch_size: int, width: int, dtype,
                 grid=None, method: str = 'bilinear'):
  """NaFlex tokens of `module` (inside its compact method): (x [B, L, width] with each
  image's position embedding resampled to its own grid, valid [B, L] bool).

  `patches`: the batch's patch dict (mmcl/data/pp_naflex.py: 'image' [B, L, p*p*3] and
  the `naflex.KEYS`). The embedding is the conv's parameter 'embedding' applied as a
  Dense, so one checkpoint serves both input modes; the position embedding is stored at
  `grid`, else at the stored grid, else (init) at the square grid isqrt(L).
  """
  missing = [k for k in ('image', *naflex.KEYS) if k not in patches]
  if missing:
    raise ValueError(f'ViT NaFlex input lacks {missing} (has {sorted(patches)}); make it '
                     'with the pp op patchify_naflex.')
  x_BxLxP = patches['image']
  _, length, dim = x_BxLxP.shape
  if dim != patch_size * patch_size * 3:
    raise ValueError(f'ViT NaFlex patches have {dim} values, expected patch_size^2 x 3 = '
                     f'{patch_size * patch_size * 3}: patchify_naflex(patch_size=...) must '
                     f'match the ViT patch size {patch_size}.')
  x_BxLxD = naflex.PatchDense(width, patch_size, dtype=dtype, name='embedding')(x_BxLxP)
  side = math.isqrt(length)
  pos_1xNxD, stored = stored_position_embedding(module, (side, side), width, grid)
  pos_BxLxD = naflex.posemb_per_image(pos_1xNxD, patches[naflex.GRID],
                                      patches[naflex.ROWS], patches[naflex.COLS],
                                      max_grid=length, old_grid=stored, method=method)
  return x_BxLxD + pos_BxLxD.astype(dtype), patches[naflex.MASK].astype(bool)


class ViT(nn.Module):
  """ViT: patchify -> (+pos, [cls]) -> pre-norm encoder -> pool -> head.

  Position embeddings are sized from the image seen at init (or fixed by `posemb_grid`);
  an image of another patch grid at apply gets them resampled (mmcl.models.posemb), e.g.
  SILC's local crops or a higher fine-tuning resolution (a stored grid must be square unless
  `posemb_grid` gives it).

  Resolution and token options (docs/resolution.md); their defaults keep the plain ViT,
  parameter layout included:
    patch_dropout: FLIP, the fraction of patch tokens dropped per image in training.
    posemb_grid: the stored position-embedding grid (g or (h, w)).
    apply_patch_size: FlexiViT, patchify at this size with the PI-resized kernel (stored at
      `patch_size`); needs posemb_grid unless the grid comes out the same.
  """
  variant: str | None = None
  num_classes: int | None = None  # Output (embedding) dim; None = no head.
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  patch_size: int | None = None
  pool: str = 'gap'
  class_token: bool | None = None  # None: only when pool == 'tok'.
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False  # nn.scan over the encoder's blocks (transformer.Encoder, check_scan).
  dtype: Any = 'float32'
  moe: Any = None  # Sparse V-MoE tower: a moe.MoeSpec dict, e.g. dict(num_experts=8).
  mesh: Any = None  # The device mesh (from setup): MoE expert parallelism.
  # Opt-in features of OpenAI CLIP / open_clip ViTs (mmcl.convert):
  pre_norm: bool = False  # LayerNorm 'pre_norm' before the encoder (open_clip ln_pre).
  head_bias: bool = True  # False: bias-free projection head (open_clip proj).
  act: str = 'gelu_tanh'  # MLP activation, a transformer.ACTIVATIONS name.
  ln_eps: float = transformer.LN_EPS  # Encoder and pre_norm LayerNorm epsilon.
  patch_dropout: float = 0.0  # FLIP: fraction of patch tokens dropped in training.
  posemb_grid: Any = None  # Stored posemb grid, g or (h, w); None: the init image's.
  posemb_resample: str = 'bilinear'  # Or 'bicubic' (posemb.METHODS).
  apply_patch_size: int | None = None  # FlexiViT: patchify at this size (PI-resize).

  def __post_init__(self):
    super().__post_init__()
    hp = self.hparams()  # Fail at construction time, not inside jit.
    transformer.check_act(self.act)
    transformer.check_scan(self.moe, hp['depth'], self.scan)
    if self.pool not in POOLS:
      raise ValueError(f'Unknown ViT pool {self.pool!r}; valid: {POOLS}')
    if self.pool == 'tok' and self.class_token is False:
      raise ValueError("ViT pool='tok' needs class_token=True (or None).")
    patch_dropout_lib.kept_count(1, self.patch_dropout)  # Range check.
    if self.posemb_resample not in posemb_lib.METHODS:
      raise ValueError(f'Unknown ViT posemb_resample {self.posemb_resample!r}; '
                       f'valid: {posemb_lib.METHODS}')
    if self.apply_patch_size is not None and self.apply_patch_size <= 0:
      raise ValueError(f'ViT apply_patch_size={self.apply_patch_size} must be > 0 or None.')

  def hparams(self) -> dict:
    return resolve_hparams(self.variant, self.width, self.depth, self.mlp_dim,
                           self.num_heads, self.patch_size)

  @nn.compact
  def __call__(self, image_BxHxWx3, *, train: bool = False, token_mask_BxN=None,
               mask_token_D=None):
    """image_BxHxWx3: images, or NaFlex's patch dict (mmcl/models/naflex.py: patches
    [B, L, p*p*3] under 'image', their grid positions and mask; docs/resolution.md), whose
    padding tokens no token attends to and pooling skips.
    token_mask_BxN (bool, optional): patches replaced by `mask_token_D` before the
    position embeddings are added (TIPS / iBOT masked prediction); None: no masking."""
    hp = self.hparams()
    dtype = transformer.canonical_dtype(self.dtype)
    p, d = hp['patch_size'], hp['width']
    out = {}

    valid_BxN = None  # NaFlex: the real (not padding) tokens.
    if isinstance(image_BxHxWx3, Mapping):
      unsupported = {'apply_patch_size': self.apply_patch_size is not None,
                     'token_mask_BxN': token_mask_BxN is not None,
                     'patch_dropout (in training)': train and self.patch_dropout > 0}
      if any(unsupported.values()):
        raise ValueError(f'ViT NaFlex input does not combine with '
                         f'{[k for k, v in unsupported.items() if v]}.')
      x_BxNxD, valid_BxN = embed_naflex(self, image_BxHxWx3, p, d, dtype, self.posemb_grid,
                                        self.posemb_resample)
      b = x_BxNxD.shape[0]
    else:
      x = embed_patches(self, image_BxHxWx3, p, d, dtype, self.apply_patch_size)
      b, h, w, _ = x.shape
      x_BxNxD = jnp.reshape(x, (b, h * w, d))
      if token_mask_BxN is not None:
        if mask_token_D is None:
          raise ValueError('ViT token_mask_BxN needs mask_token_D (the learned mask token).')
        x_BxNxD = jnp.where(token_mask_BxN[:, :, None],
                            mask_token_D[None, None, :].astype(dtype), x_BxNxD)
      pos_1xNxD = position_embedding(self, (h, w), d, self.posemb_grid, self.posemb_resample)
      x_BxNxD = x_BxNxD + pos_1xNxD.astype(dtype)
      if train and self.patch_dropout > 0:  # FLIP; before the class token, so it always stays.
        x_BxNxD = patch_dropout_lib.drop_patches(x_BxNxD, self.patch_dropout,
                                                 self.make_rng('dropout'))

    use_cls = self.pool == 'tok' if self.class_token is None else (
        self.class_token)
    if use_cls:
      cls_1x1xD = self.param('cls', nn.initializers.zeros, (1, 1, d),
                             transformer.PARAM_DTYPE)
      cls_Bx1xD = jnp.tile(cls_1x1xD, (b, 1, 1)).astype(dtype)
      x_BxNxD = jnp.concatenate([cls_Bx1xD, x_BxNxD], axis=1)
      if valid_BxN is not None:
        valid_BxN = jnp.concatenate([jnp.ones((b, 1), bool), valid_BxN], axis=1)

    if self.pre_norm:
      x_BxNxD = nn.LayerNorm(epsilon=self.ln_eps, dtype=dtype,
                             param_dtype=transformer.PARAM_DTYPE, name='pre_norm')(x_BxNxD)
    x_BxNxD = nn.Dropout(rate=self.dropout)(x_BxNxD, not train)
    x_BxNxD, aux = transformer.Encoder(
        depth=hp['depth'], mlp_dim=hp['mlp_dim'], num_heads=hp['num_heads'],
        dropout=self.dropout, remat=self.remat, dtype=dtype, act=self.act,
        ln_eps=self.ln_eps, scan=self.scan, moe=self.moe, mesh=self.mesh,
        name='Transformer')(x_BxNxD, None if valid_BxN is None else naflex.attention_mask(
            valid_BxN), deterministic=not train, modality='image', valid_BxL=valid_BxN)
    if self.moe is not None:
      out['aux_loss'], out['metrics'] = aux['loss'], aux['metrics']
    out['encoded'] = x_BxNxD

    if self.pool == 'tok':
      x_BxD = x_BxNxD[:, 0]
    elif self.pool == 'gap':
      # Average over patch tokens only; the class token (if any) is skipped.
      x_BxD = (jnp.mean(x_BxNxD[:, int(use_cls):], axis=1) if valid_BxN is None else
               naflex.masked_mean(x_BxNxD[:, int(use_cls):], valid_BxN[:, int(use_cls):]))
    else:  # 'map'
      x_BxD = transformer.MAPHead(
          mlp_dim=hp['mlp_dim'], num_heads=hp['num_heads'], dtype=dtype,
          name='MAPHead_0')(x_BxNxD, valid_BxN)
    out['pre_logits'] = x_BxD

    if self.num_classes is not None:
      x_BxD = transformer.head(self.num_classes, self.head_bias)(x_BxD)
      out['logits'] = x_BxD
    return x_BxD, out
