"""Text Transformer tower (CLIP- or SigLIP-style)."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mmcl.models import moe as moe_lib
from mmcl.models import transformer

STYLES = ('clip', 'siglip')
POOLS = ('eot', 'argmax', 'last', 'first', 'gap', 'map')
PAD_ID = 0


def decode_variant(variant: str | None) -> dict:
  """'B' -> dict(width=768, depth=12, mlp_dim=3072, num_heads=12)."""
  if variant is None:
    return {}
  if variant not in transformer.VARIANTS:
    raise ValueError(f'Unknown text variant {variant!r}; valid: '
                     f'{", ".join(transformer.VARIANTS)} (no patch size)')
  return dict(transformer.VARIANTS[variant])


def resolve_hparams(variant=None, width=None, depth=None, mlp_dim=None,
                    num_heads=None) -> dict:
  """Variant table entry with the explicit (non-None) fields overriding it."""
  return transformer.merge_hparams(
      'TextTransformer', decode_variant(variant),
      dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads))


def eot_index(text_BxL):
  """Index of the last non-pad token per row (0 for an all-pad row)."""
  _, l = text_BxL.shape
  pos_1xL = jnp.arange(l)[None, :]
  return jnp.max(jnp.where(text_BxL != PAD_ID, pos_1xL, 0), axis=1)


def routed_tokens(text_BxL, moe, style: str, pool: str | None):
  """Which text tokens MoE layers route: None (all), or with `route_padding=False` in the
  MoE spec, each row's tokens up to its EOT. Padding after EOT cannot reach the output only
  of causal text pooled at EOT, so other styles and pools are refused."""
  if moe is None or moe_lib.MoeSpec.make(moe).route_padding:
    return None
  if style != 'clip' or (pool or 'eot') != 'eot':
    raise ValueError(
        f'MoE route_padding=False needs causal text pooled at EOT (style="clip", pool="eot" '
        f'or None); got style={style!r}, pool={pool!r}: there padding reaches the output.')
  if text_BxL is None:  # Validation only.
    return None
  _, l = text_BxL.shape
  return jnp.arange(l)[None, :] <= eot_index(text_BxL)[:, None]


def at_positions(x_BxLxD, index_B):
  """x[b, index[b]] per row. take_along_axis keeps rows on their devices under data
  parallelism; fancy indexing x[arange(B), index] made GSPMD all-gather the indices and
  all-reduce [B, D] (tests/test_collectives.py)."""
  return jnp.take_along_axis(x_BxLxD, index_B[:, None, None], axis=1)[:, 0]


def pool_tokens(x_BxLxD, text_BxL, pool: str):
  """The parameter-free poolings of POOLS (all but 'map', which needs a module)."""
  if pool == 'eot':
    return at_positions(x_BxLxD, eot_index(text_BxL))
  if pool == 'argmax':  # open_clip: the EOT token has the largest id.
    return at_positions(x_BxLxD, jnp.argmax(text_BxL, axis=1))
  if pool == 'last':
    return x_BxLxD[:, -1]
  if pool == 'first':
    return x_BxLxD[:, 0]
  if pool == 'gap':  # Plain mean over all L positions (pads included), as in big_vision.
    return jnp.mean(x_BxLxD, axis=1)
  raise ValueError(f'pool_tokens has no parameter-free pool {pool!r}; valid: '
                   f'{[p for p in POOLS if p != "map"]}')


def embed_tokens(module: nn.Module, ids_BxL, vocab_size: int, width: int, max_len: int,
                 dtype, name: str = 'embedding', pos_name: str = 'pos_embedding'):
  """Token + learned position embedding of `module` (inside its compact method)."""
  _, l = ids_BxL.shape
  if l > max_len:
    raise ValueError(f'Text length {l} exceeds max_len {max_len}.')
  x_BxLxD = nn.Embed(vocab_size, width, dtype=dtype, param_dtype=transformer.PARAM_DTYPE,
                     embedding_init=nn.initializers.normal(stddev=0.02), name=name)(ids_BxL)
  pos_1xMxD = module.param(pos_name, nn.initializers.normal(stddev=0.01),
                           (1, max_len, width), transformer.PARAM_DTYPE)
  return x_BxLxD + pos_1xMxD[:, :l].astype(dtype)


class TextTransformer(nn.Module):
  """Token + position embedding -> pre-norm encoder -> pool -> head.

  style='clip': causal mask, pool at the EOT (last non-pad) token.
  style='siglip': bidirectional, pool at the last position.
  `pool` overrides the style's pooling when given; 'argmax' pools at the
  highest token id (CLIP's EOT, as open_clip does), 'eot' at the last non-pad.
  """
  variant: str | None = None
  num_classes: int | None = None  # Output (embedding) dim; None = no head.
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  vocab_size: int = 32_000
  max_len: int = 64
  style: str = 'siglip'
  pool: str | None = None
  dropout: float = 0.0
  remat: bool | str = False
  scan: bool = False  # nn.scan over the encoder's blocks (transformer.Encoder, check_scan).
  dtype: Any = 'float32'
  moe: Any = None  # Sparse MoE tower: a moe.MoeSpec dict, e.g. dict(num_experts=8).
  mesh: Any = None  # The device mesh (from setup): MoE expert parallelism.
  # Opt-in features of open_clip text towers (mmcl.convert):
  head_bias: bool = True  # False: bias-free projection head (open_clip text_projection).
  act: str = 'gelu_tanh'  # MLP activation, a transformer.ACTIVATIONS name.
  ln_eps: float = transformer.LN_EPS  # Encoder LayerNorm epsilon.
  # Pads (id 0) are embedded as this id; big_vision SigLIP's "sticky EOS" (pads = EOS = 1).
  pad_as: int | None = None

  def __post_init__(self):
    super().__post_init__()
    hp = self.hparams()  # Fail at construction time, not inside jit.
    transformer.check_act(self.act)
    transformer.check_scan(self.moe, hp['depth'], self.scan)
    routed_tokens(None, self.moe, self.style, self.pool)
    if self.style not in STYLES:
      raise ValueError(f'Unknown text style {self.style!r}; valid: {STYLES}')
    if self.pool is not None and self.pool not in POOLS:
      raise ValueError(f'Unknown text pool {self.pool!r}; valid: {POOLS}')

  def hparams(self) -> dict:
    return resolve_hparams(self.variant, self.width, self.depth, self.mlp_dim,
                           self.num_heads)

  @nn.compact
  def __call__(self, text_BxL, *, train: bool = False):
    hp = self.hparams()
    dtype = transformer.canonical_dtype(self.dtype)
    d = hp['width']
    _, l = text_BxL.shape
    out = {}

    ids_BxL = text_BxL
    if self.pad_as is not None:  # Pooling below still sees the original ids.
      ids_BxL = jnp.where(text_BxL == PAD_ID, self.pad_as, text_BxL)
    x_BxLxD = embed_tokens(self, ids_BxL, self.vocab_size, d, self.max_len, dtype)
    x_BxLxD = nn.Dropout(rate=self.dropout)(x_BxLxD, not train)

    mask = None
    if self.style == 'clip':
      mask = nn.make_causal_mask(jnp.ones((1, l), jnp.bool_), dtype=jnp.bool_)
    x_BxLxD, aux = transformer.Encoder(
        depth=hp['depth'], mlp_dim=hp['mlp_dim'], num_heads=hp['num_heads'],
        dropout=self.dropout, remat=self.remat, dtype=dtype, act=self.act,
        ln_eps=self.ln_eps, scan=self.scan, moe=self.moe, mesh=self.mesh,
        name='Transformer')(x_BxLxD, mask, deterministic=not train, modality='text',
                            valid_BxL=routed_tokens(text_BxL, self.moe, self.style, self.pool))
    if self.moe is not None:
      out['aux_loss'], out['metrics'] = aux['loss'], aux['metrics']
    out['encoded'] = x_BxLxD

    pool = self.pool or ('eot' if self.style == 'clip' else 'last')
    if pool == 'map':
      x_BxD = transformer.MAPHead(
          mlp_dim=hp['mlp_dim'], num_heads=hp['num_heads'], dtype=dtype,
          name='MAPHead_0')(x_BxLxD)
    else:
      x_BxD = pool_tokens(x_BxLxD, text_BxL, pool)
    out['pre_logits'] = x_BxD

    if self.num_classes is not None:
      x_BxD = transformer.head(self.num_classes, self.head_bias)(x_BxD)
      out['logits'] = x_BxD
    return x_BxD, out
