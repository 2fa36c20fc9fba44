"""Shared pre-norm Transformer pieces for the image and text towers.

All modules take a compute `dtype` (e.g. jnp.bfloat16) and keep their
parameters in float32, so mixed precision never touches the optimizer state.
"""
import math
from collections.abc import Mapping
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mmcl.models import moe as moe_lib

Dtype = Any
PARAM_DTYPE = jnp.float32
# The projection into the contrastive space, and everything after it (normalisation, logits,
# loss), runs in float32 at full matmul precision whatever the towers' dtype: on a TPU the
# default precision rounds matmul inputs to bf16, and with a logit scale of 100 that
# rounding alone moves logits by up to ~0.06 (tools/bench_precision.py; DESIGN_NOTES.md).
HEAD_DTYPE = jnp.float32
HEAD_PRECISION = jax.lax.Precision.HIGHEST

# Same initialisers as big_vision's ViT: xavier kernels, near-zero MLP biases.
_KERNEL_INIT = nn.initializers.xavier_uniform()
_MLP_BIAS_INIT = nn.initializers.normal(stddev=1e-6)

# MLP activations (`act=` of the towers). 'gelu_tanh' (big_vision's, the default) is flax's
# nn.gelu; 'gelu' is the exact erf GELU (torch nn.GELU, open_clip's default); 'quick_gelu' is
# OpenAI CLIP's x * sigmoid(1.702 x).
ACTIVATIONS = {
    'gelu_tanh': lambda x: nn.gelu(x, approximate=True),
    'gelu': lambda x: nn.gelu(x, approximate=False),
    'quick_gelu': lambda x: x * nn.sigmoid(1.702 * x),
}
LN_EPS = 1e-6  # flax's LayerNorm default; torch (open_clip) uses 1e-5.


def check_act(act: str) -> str:
  if act not in ACTIVATIONS:
    raise ValueError(f'Unknown activation {act!r}; valid: {sorted(ACTIVATIONS)}')
  return act


def canonical_dtype(dtype: Dtype) -> jnp.dtype:
  """Accepts 'bfloat16' / jnp.bfloat16 / np.dtype and returns a jnp dtype."""
  return jnp.dtype(dtype)


def heads_first_attention(query, key, value, bias=None, mask=None, broadcast_dropout=True,
                          dropout_rng=None, dropout_rate=0.0, deterministic=False, dtype=None,
                          precision=None, force_fp32_for_softmax=False):
  """flax's `nn.dot_product_attention` (same arguments, same result) computed with the heads
  axis before the length axis: [..., L, H, Dh] inputs are swapped to [..., H, L, Dh] first.

  Why: XLA:CPU then runs the score and value matmuls and their gradients as plain batched
  matmuls instead of transposing in the backward pass: two attention sub-blocks 263 vs 280 ms
  (`tools/bench_parts.py --layouts`, BENCHMARKS.md section 7). On TPU the layouts are the compiler's choice either way.
  """
  dtype = dtype or query.dtype
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  q, k, v = (jnp.swapaxes(a, -3, -2) for a in (query, key, value))
  weights = jnp.einsum('...qd,...kd->...qk', q, k, precision=precision)
  if bias is not None:
    weights = weights + bias
  if mask is not None:
    weights = jnp.where(mask, weights, jnp.finfo(dtype).min)
  if force_fp32_for_softmax and dtype != jnp.float32:
    weights = jax.nn.softmax(weights.astype(jnp.float32))
  else:
    weights = jax.nn.softmax(weights).astype(dtype)
  if not deterministic and dropout_rate > 0.0:  # As flax: same mask shape, same random bits.
    keep_prob = 1.0 - dropout_rate
    shape = (1,) * (key.ndim - 2) + weights.shape[-2:] if broadcast_dropout else weights.shape
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
  out = jnp.einsum('...qk,...kd->...qd', weights, v, precision=precision)
  return jnp.swapaxes(out, -3, -2)


def attention(num_heads: int, dtype: Dtype, name: str | None = None):
  """The towers' multi-head attention: float32 params, float32 softmax, heads-first layout."""
  # Softmax in float32 keeps bf16 attention close to the fp32 reference.
  return nn.MultiHeadDotProductAttention(
      num_heads=num_heads,
      dtype=dtype,
      param_dtype=PARAM_DTYPE,
      kernel_init=_KERNEL_INIT,
      force_fp32_for_softmax=True,
      attention_fn=heads_first_attention,
      name=name)


def head(dim: int, use_bias: bool = True, name: str = 'head') -> nn.Dense:
  """The projection into the contrastive space: float32 at HEAD_PRECISION (see above)."""
  return nn.Dense(dim, use_bias=use_bias, dtype=HEAD_DTYPE, precision=HEAD_PRECISION,
                  param_dtype=PARAM_DTYPE, name=name)


class MlpBlock(nn.Module):
  """Dense -> GELU -> dropout -> Dense, back to the input width."""
  mlp_dim: int | None = None  # Defaults to 4x the input width.
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  act: str = 'gelu_tanh'  # An ACTIVATIONS name.

  @nn.compact
  def __call__(self, x_BxLxD, deterministic: bool = True):
    d = x_BxLxD.shape[-1]
    dense = lambda n: nn.Dense(  # pylint: disable=g-long-lambda
        n, dtype=self.dtype, param_dtype=PARAM_DTYPE,
        kernel_init=_KERNEL_INIT, bias_init=_MLP_BIAS_INIT)
    # Tokens flattened to one axis: the weight gradient is then a plain 2-D matmul, where the
    # [B, L] contraction made XLA:CPU transpose first (`tools/bench_parts.py --layouts`).
    x_NxD = x_BxLxD.reshape(-1, d)
    x_NxF = ACTIVATIONS[self.act](dense(self.mlp_dim or 4 * d)(x_NxD))
    x_NxF = nn.Dropout(rate=self.dropout)(x_NxF, deterministic)
    return dense(d)(x_NxF).reshape(x_BxLxD.shape)


class MoeMlp(nn.Module):
  """Router + E expert MLPs (stacked on a leading expert dim): a block's sparse MLP.

  `mesh`: with an expert axis of size > 1 the layer runs expert-parallel (moe.moe_sharded).
  Returns (y, stats) (moe.moe_apply's stats).
  """
  spec: Any = None  # moe.MoeSpec or its dict.
  mlp_dim: int | None = None  # Used when spec.mlp_dim is None; default 4x width.
  dtype: Dtype = jnp.float32
  act: str = 'gelu_tanh'
  mesh: Any = None

  @nn.compact
  def __call__(self, x_BxLxM, *, train: bool = False, modality: str = 'image',
               valid_BxL=None):
    spec = moe_lib.MoeSpec.make(self.spec)
    m, e = x_BxLxM.shape[-1], spec.num_experts
    h = spec.mlp_dim or self.mlp_dim or 4 * m
    # Each expert's kernels are initialised like a dense MLP's (fan-in/out of one expert).
    per_expert = lambda init: lambda k, shape, dt: jax.vmap(  # pylint: disable=g-long-lambda
        lambda kk: init(kk, shape[1:], dt))(jax.random.split(k, shape[0]))
    params = {
        'router': self.param('router', nn.initializers.normal(stddev=0.02), (m, e),
                             PARAM_DTYPE),
        'wi': self.param('wi', per_expert(_KERNEL_INIT), (e, m, h), PARAM_DTYPE),
        'bi': self.param('bi', _MLP_BIAS_INIT, (e, h), PARAM_DTYPE),
        'wo': self.param('wo', per_expert(_KERNEL_INIT), (e, h, m), PARAM_DTYPE),
        'bo': self.param('bo', _MLP_BIAS_INIT, (e, m), PARAM_DTYPE),
    }
    noise = None
    std = spec.noise_std if spec.noise_std is not None else 1.0 / e
    if train and std > 0:
      noise = std * jax.random.normal(self.make_rng('dropout'), x_BxLxM.shape[:-1] + (e,))
    kw = dict(spec=spec, train=train, modality=modality, act=ACTIVATIONS[self.act])
    mesh = moe_lib.expert_mesh(self.mesh, spec.expert_axis)
    if mesh is None:
      y, stats, _ = moe_lib.moe_apply(params, x_BxLxM, noise, valid_BxL, **kw)
    else:
      y, stats, _ = moe_lib.moe_sharded(params, x_BxLxM, noise, valid_BxL, mesh=mesh, **kw)
    return y, stats


class EncoderBlock(nn.Module):
  """Pre-norm block: x + Attn(LN(x)), then x + MLP(LN(x)); the MLP is dense (MlpBlock) or,
  with `moe`, sparse (MoeMlp, params under 'moe'). Returns (x, stats): the MoE layer's
  statistics, {} for a dense block."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  dtype: Dtype = jnp.float32
  act: str = 'gelu_tanh'
  ln_eps: float = LN_EPS
  moe: Any = None  # A moe.MoeSpec (or its dict): this block's MLP is sparse.
  mesh: Any = None  # For MoE expert parallelism (MoeMlp).

  @nn.compact
  def __call__(self, x_BxLxD, mask=None, deterministic: bool = True, modality: str = 'image',
               valid_BxL=None):
    """`mask` is boolean, broadcastable to [B, heads, L, L]; True = attend. `modality` and
    `valid_BxL` (tokens to route) are for a sparse MLP (moe.moe_apply)."""
    ln = lambda: nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE)
    y = ln()(x_BxLxD)
    y = attention(self.num_heads, self.dtype)(
        y, y, mask=mask, deterministic=deterministic)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    x_BxLxD = x_BxLxD + y

    y = ln()(x_BxLxD)
    stats = {}
    if self.moe is None:
      y = MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout,
                   dtype=self.dtype, act=self.act)(y, deterministic)
    else:
      y, stats = MoeMlp(spec=self.moe, mlp_dim=self.mlp_dim, dtype=self.dtype, act=self.act,
                        mesh=self.mesh, name='moe')(
                            y, train=not deterministic, modality=modality, valid_BxL=valid_BxL)
    y = nn.Dropout(rate=self.dropout)(y, deterministic)
    return x_BxLxD + y, stats


# What the backward pass may keep instead of recomputing (`remat=` of the towers):
# 'full' (= True) keeps only each block's input; 'dots' keeps matmul outputs; 'dots_no_batch'
# keeps matmul outputs without batch dimensions (weights-like); False / 'none': no remat.
REMAT_POLICIES = {
    'full': None,
    'dots': jax.checkpoint_policies.dots_saveable,
    'dots_no_batch': jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


def remat_block(block_cls, remat: bool | str, static_argnums: tuple[int, ...]):
  """`block_cls`, rematerialised by the policy `remat` names (see REMAT_POLICIES)."""
  if remat in (False, None, 'none'):
    return block_cls
  policy = 'full' if remat is True else remat
  if policy not in REMAT_POLICIES:
    raise ValueError(f'Unknown remat policy {remat!r}; valid: False, True, "none", '
                     f'{sorted(REMAT_POLICIES)}')
  return nn.remat(block_cls, static_argnums=static_argnums, policy=REMAT_POLICIES[policy])


def moe_layers(moe, depth: int) -> tuple[int, ...]:
  """The sparse layers of an encoder of `depth` blocks (none without `moe`)."""
  return () if moe is None else moe_lib.MoeSpec.make(moe).layer_ids(depth)


def check_scan(moe, depth: int, scan: bool):
  """nn.scan repeats one block, so its layers must be alike: all dense or all sparse."""
  sparse = moe_layers(moe, depth)
  if scan and 0 < len(sparse) < depth:
    raise ValueError(f'scan=True needs every layer alike, but MoE layers {list(sparse)} of '
                     f'{depth} are sparse; set moe.every=1 (all sparse) or scan=False.')


class Encoder(nn.Module):
  """A stack of `depth` EncoderBlocks followed by a final LayerNorm; with `moe` the blocks
  at `moe.layer_ids(depth)` have sparse MLPs (same param names, 'moe' for 'MlpBlock_0').

  Returns (x, aux): aux = {'loss': the MoE layers' summed weighted losses (0 when dense),
  'metrics': {'moe/layer{i}/{modality}/{name}': scalar}}.

  With `scan=True` the blocks run as one `nn.scan`: XLA compiles one block instead of
  `depth` copies (compile time; BENCHMARKS.md) and the params are stacked along a leading
  depth axis under 'encoderblock' ('encoderblock_<i>' otherwise; `stack_blocks` /
  `unstack_blocks` convert between the two layouts). A sparse encoder scans when every
  layer is sparse (`check_scan`).
  """
  depth: int
  mlp_dim: int | None = None
  num_heads: int = 12
  dropout: float = 0.0
  remat: bool | str = False  # Or a REMAT_POLICIES name.
  dtype: Dtype = jnp.float32
  act: str = 'gelu_tanh'
  ln_eps: float = LN_EPS
  scan: bool = False
  moe: Any = None  # A moe.MoeSpec (or its dict): sparse MLPs at its layer_ids(depth).
  mesh: Any = None  # The device mesh, for MoE expert parallelism.

  @nn.compact
  def __call__(self, x_BxLxD, mask=None, *, deterministic: bool = True,
               modality: str = 'image', valid_BxL=None):
    """`modality` and `valid_BxL`: see moe.moe_apply (MoE layers only)."""
    if modality not in moe_lib.MODALITIES:
      raise ValueError(f'Unknown modality {modality!r}; valid: {moe_lib.MODALITIES}')
    spec = None if self.moe is None else moe_lib.MoeSpec.make(self.moe)
    check_scan(spec, self.depth, self.scan)
    sparse = moe_layers(spec, self.depth)
    # `deterministic` and `modality` (args 3 and 4, counting self) are static.
    block_cls = remat_block(EncoderBlock, self.remat, static_argnums=(3, 4))
    kw = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, dropout=self.dropout,
              dtype=self.dtype, act=self.act, ln_eps=self.ln_eps, mesh=self.mesh)
    args = (mask, deterministic, modality, valid_BxL)
    layer_stats = {}
    if self.scan:
      # A function target closes over the other arguments; only x is carried.
      blocks = nn.scan(lambda block, x, _: block(x, *args),
                       variable_axes={'params': 0},
                       split_rngs={'params': True, 'dropout': True}, length=self.depth)
      x_BxLxD, stacked = blocks(block_cls(**kw, moe=spec if sparse else None,
                                          name='encoderblock'), x_BxLxD, None)
      if sparse:
        layer_stats = {i: jax.tree.map(lambda v, i=i: v[i], stacked) for i in sparse}
    else:
      for i in range(self.depth):
        x_BxLxD, stats = block_cls(**kw, moe=spec if i in sparse else None,
                                   name=f'encoderblock_{i}')(x_BxLxD, *args)
        if stats:
          layer_stats[i] = stats
    loss, metrics = jnp.zeros((), jnp.float32), {}
    for i, stats in layer_stats.items():
      stats = dict(stats)
      loss = loss + stats.pop('loss')
      metrics.update({f'moe/layer{i}/{modality}/{k}': v for k, v in stats.items()})
    x_BxLxD = nn.LayerNorm(epsilon=self.ln_eps, dtype=self.dtype, param_dtype=PARAM_DTYPE,
                           name='encoder_norm')(x_BxLxD)
    return x_BxLxD, {'loss': loss, 'metrics': metrics}


def stack_blocks(params):
  """Params of an unscanned model -> the `scan=True` layout, in every Encoder of the tree."""
  if not isinstance(params, Mapping):
    return params
  names = [k for k in params if k.startswith('encoderblock_')]
  if not names:
    return {k: stack_blocks(v) for k, v in params.items()}
  blocks = [params[f'encoderblock_{i}'] for i in range(len(names))]  # KeyError: a gap.
  out = {k: stack_blocks(v) for k, v in params.items() if k not in names}
  # Host arrays stay on the host (a converted checkpoint may not fit on one device).
  stack = lambda *xs: jnp.stack(xs) if isinstance(xs[0], jax.Array) else np.stack(xs)
  out['encoderblock'] = jax.tree.map(stack, *blocks)
  return out


def unstack_blocks(params):
  """The inverse of `stack_blocks`: a scanned model's params -> 'encoderblock_<i>'."""
  if not isinstance(params, Mapping):
    return params
  out = {k: unstack_blocks(v) for k, v in params.items() if k != 'encoderblock'}
  if 'encoderblock' in params:
    depth = jax.tree.leaves(params['encoderblock'])[0].shape[0]
    for i in range(depth):
      out[f'encoderblock_{i}'] = jax.tree.map(lambda x: x[i], params['encoderblock'])
  return out


class MAPHead(nn.Module):
  """Multihead attention pooling: a learned probe attends over the tokens."""
  mlp_dim: int | None = None
  num_heads: int = 12
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x_BxLxD, valid_BxL=None):
    """valid_BxL (bool, optional): the tokens the probe may attend to (NaFlex padding not)."""
    b, _, d = x_BxLxD.shape
    probe_1x1xD = self.param('probe', _KERNEL_INIT, (1, 1, d), PARAM_DTYPE)
    probe_Bx1xD = jnp.tile(probe_1x1xD, (b, 1, 1)).astype(self.dtype)
    mask = None if valid_BxL is None else valid_BxL[:, None, None, :]
    x_Bx1xD = attention(self.num_heads, self.dtype)(
        probe_Bx1xD, x_BxLxD, mask=mask, deterministic=True)
    y = nn.LayerNorm(dtype=self.dtype, param_dtype=PARAM_DTYPE)(x_Bx1xD)
    x_Bx1xD = x_Bx1xD + MlpBlock(mlp_dim=self.mlp_dim, dtype=self.dtype)(y)
    return x_Bx1xD[:, 0]


def count_params(tree) -> int:
  """Number of scalars in a (possibly abstract) param tree."""
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


# Tower sizes shared by the image and text towers: (width, depth, mlp, heads).
VARIANTS = {
    'pico': dict(width=64, depth=2, mlp_dim=256, num_heads=2),
    'nano': dict(width=128, depth=4, mlp_dim=512, num_heads=4),
    'Ti': dict(width=192, depth=12, mlp_dim=768, num_heads=3),
    'S': dict(width=384, depth=12, mlp_dim=1536, num_heads=6),
    'M': dict(width=512, depth=12, mlp_dim=2048, num_heads=8),
    'B': dict(width=768, depth=12, mlp_dim=3072, num_heads=12),
    'L': dict(width=1024, depth=24, mlp_dim=4096, num_heads=16),
    'H': dict(width=1280, depth=32, mlp_dim=5120, num_heads=16),
    'So400m': dict(width=1152, depth=27, mlp_dim=4304, num_heads=16),
}


def merge_hparams(kind: str, base: dict, overrides: dict) -> dict:
  """Overrides (when not None) win over `base`; every key must end up set."""
  hp = dict(base)
  hp.update({k: v for k, v in overrides.items() if v is not None})
  missing = sorted(k for k in overrides if hp.get(k) is None)
  if missing:
    raise ValueError(
        f'{kind}: missing {missing}; give a variant (one of '
        f'{", ".join(VARIANTS)}) or set these fields explicitly.')
  if hp['width'] % hp['num_heads']:
    raise ValueError(f'{kind}: width {hp["width"]} is not divisible by '
                     f'num_heads {hp["num_heads"]}.')
  return hp
