"""A text decoder over the image tower's tokens: CoCa / CapPa / LocCa captioning.

Pre-norm blocks of causal self-attention over the text tokens, cross-attention to the image
tower's unpooled tokens (`out['img/encoded']`), and an MLP, built from transformer.py's pieces
(attention, MlpBlock, remat policies, float32 params with a compute dtype). Its loss is the
token-level cross-entropy over `loss_mask` (padding and prompts are never scored).

Two ways to read a caption (Tschannen et al. 2023, "Image Captioners Are Scalable Vision
Learners Too", CapPa; big_vision's proj/cappa):
- autoregressive: inputs are the tokens shifted right (BOS = pad id 0), causal attention;
- parallel prediction: every scored input is a [MASK] token (id = vocab_size) and attention
  is bidirectional, so each token is predicted from the image (and the prompt) alone. CapPa
  samples it per example with probability `parallel_prob` (0.75 in big_vision's CapPa
  config: masked_pred_prob=0.75, masking_ratio=1.0).
"""
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmcl.models import transformer

PAD_ID = 0  # Also the BOS input of the first position (big_vision's shift_right).


def shift_right(tokens_BxL):
  """Teacher-forcing inputs: position t sees token t-1; position 0 sees BOS (= pad id 0)."""
  return jnp.pad(tokens_BxL, ((0, 0), (1, 0)), constant_values=PAD_ID)[:, :-1]


class DecoderBlock(nn.Module):
  """x + SelfAttn(LN(x)), x + CrossAttn(LN(x), image tokens), x + MLP(LN(x))."""
  mlp_dim: int | None = None
  num_heads: int = 8
  dropout: float = 0.0
  dtype: Any = jnp.float32
  act: str = 'gelu_tanh'

  @nn.compact
  def __call__(self, x_BxLxD, encoded_BxNxE, mask, deterministic: bool = True):
    ln = lambda name: nn.LayerNorm(epsilon=transformer.LN_EPS, dtype=self.dtype,
                                   param_dtype=transformer.PARAM_DTYPE, name=name)
    drop = lambda y: nn.Dropout(rate=self.dropout)(y, deterministic)
    attn = lambda name: transformer.attention(self.num_heads, self.dtype, name)
    y = ln('LayerNorm_self')(x_BxLxD)
    x_BxLxD = x_BxLxD + drop(attn('SelfAttn')(y, y, mask=mask, deterministic=deterministic))
    y = ln('LayerNorm_cross')(x_BxLxD)
    x_BxLxD = x_BxLxD + drop(attn('CrossAttn')(y, encoded_BxNxE.astype(self.dtype),
                                               deterministic=deterministic))
    y = ln('LayerNorm_mlp')(x_BxLxD)
    y = transformer.MlpBlock(mlp_dim=self.mlp_dim, dropout=self.dropout, dtype=self.dtype,
                             act=self.act, name='MlpBlock')(y, deterministic)
    return x_BxLxD + drop(y)


class TextDecoder(nn.Module):
  """Token embedding + position -> `depth` DecoderBlocks -> LayerNorm -> vocabulary logits.

  vocab_size counts every output token (text + location tokens); with `parallel_prob` > 0
  the input table has one more row, the [MASK] token (id vocab_size).
  """
  vocab_size: int
  variant: str | None = None
  width: int | None = None
  depth: int | None = None
  mlp_dim: int | None = None
  num_heads: int | None = None
  max_len: int = 64
  dropout: float = 0.0
  remat: bool | str = False
  dtype: Any = 'float32'
  act: str = 'gelu_tanh'
  tie_embedding: bool = False  # Logits from the token embedding (transposed).
  parallel_prob: float = 0.0  # CapPa: share of examples read by parallel prediction.
  loss_weight: float = 1.0  # Of the caption loss beside the contrastive one (two_towers).

  def __post_init__(self):
    super().__post_init__()
    self.hparams()
    transformer.check_act(self.act)
    if not 0.0 <= self.parallel_prob <= 1.0:
      raise ValueError(f'decoder parallel_prob must be in [0, 1], got {self.parallel_prob}.')
    if self.vocab_size < 2 or self.max_len < 1:
      raise ValueError(f'decoder vocab_size ({self.vocab_size}) must be >= 2 and max_len '
                       f'({self.max_len}) >= 1.')

  def hparams(self) -> dict:
    base = dict(transformer.VARIANTS[self.variant]) if self.variant else {}
    if self.variant and self.variant not in transformer.VARIANTS:
      raise ValueError(f'Unknown decoder variant {self.variant!r}; valid: '
                       f'{", ".join(transformer.VARIANTS)}')
    return transformer.merge_hparams('TextDecoder', base, dict(
        width=self.width, depth=self.depth, mlp_dim=self.mlp_dim, num_heads=self.num_heads))

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @nn.compact
  def __call__(self, encoded_BxNxE, inputs_BxL, parallel_B=None, *, train: bool = False):
    """Logits [B, L, vocab_size] (float32). `parallel_B` (bool [B]): bidirectional rows."""
    hp = self.hparams()
    dtype = transformer.canonical_dtype(self.dtype)
    b, l = inputs_BxL.shape
    if l > self.max_len:
      raise ValueError(f'Decoder length {l} exceeds max_len {self.max_len}.')
    embed = nn.Embed(self.vocab_size + int(self.parallel_prob > 0), hp['width'], dtype=dtype,
                     param_dtype=transformer.PARAM_DTYPE,
                     embedding_init=nn.initializers.normal(stddev=0.02), name='embedding')
    pos_1xMxD = self.param('pos_embedding', nn.initializers.normal(stddev=0.01),
                           (1, self.max_len, hp['width']), transformer.PARAM_DTYPE)
    x_BxLxD = embed(inputs_BxL) + pos_1xMxD[:, :l].astype(dtype)
    mask = nn.make_causal_mask(jnp.ones((1, l), jnp.bool_), dtype=jnp.bool_)  # [1,1,L,L]
    if parallel_B is not None:
      mask = mask | parallel_B[:, None, None, None]
    # `deterministic` is argument 4 counting self: static for remat.
    block_cls = transformer.remat_block(DecoderBlock, self.remat, static_argnums=(4,))
    for i in range(hp['depth']):
      x_BxLxD = block_cls(mlp_dim=hp['mlp_dim'], num_heads=hp['num_heads'],
                          dropout=self.dropout, dtype=dtype, act=self.act,
                          name=f'decoderblock_{i}')(x_BxLxD, encoded_BxNxE, mask, not train)
    x_BxLxD = nn.LayerNorm(epsilon=transformer.LN_EPS, dtype=dtype,
                           param_dtype=transformer.PARAM_DTYPE, name='decoder_norm')(x_BxLxD)
    x_BxLxD = x_BxLxD.astype(transformer.HEAD_DTYPE)
    if self.tie_embedding:
      table_VxD = embed.embedding[:self.vocab_size].astype(transformer.HEAD_DTYPE)
      return jnp.einsum('bld,vd->blv', x_BxLxD, table_VxD,
                        precision=transformer.HEAD_PRECISION)
    # Zero-initialised logits as big_vision's CapPa decoder (LogitsDense).
    return nn.Dense(self.vocab_size, dtype=transformer.HEAD_DTYPE,
                    precision=transformer.HEAD_PRECISION, param_dtype=transformer.PARAM_DTYPE,
                    kernel_init=nn.initializers.zeros, name='head')(x_BxLxD)

  def inputs(self, tokens_BxL, loss_mask_BxL, parallel_B):
    """Decoder inputs: shifted tokens, or for parallel rows the tokens with every scored or
    padding position replaced by [MASK] (the prompt stays visible: it names the task)."""
    autoregressive = shift_right(tokens_BxL)
    prompt = (loss_mask_BxL == 0) & (tokens_BxL != PAD_ID)
    masked = jnp.where(prompt, tokens_BxL, self.mask_id)
    return jnp.where(parallel_B[:, None], masked, autoregressive)

  def loss(self, encoded_BxNxE, tokens_BxL, loss_mask_BxL, *, train: bool = False):
    """(mean cross-entropy over the scored tokens, metrics). Parallel rows are drawn with
    the 'dropout' rng in training only; evaluation reads every row autoregressively."""
    b = tokens_BxL.shape[0]
    if train and self.parallel_prob > 0:
      parallel_B = jax.random.uniform(self.make_rng('dropout'), (b,)) < self.parallel_prob
    else:
      parallel_B = jnp.zeros((b,), jnp.bool_)
    logits_BxLxV = self(encoded_BxNxE, self.inputs(tokens_BxL, loss_mask_BxL, parallel_B),
                        parallel_B, train=train)
    return caption_loss(logits_BxLxV, tokens_BxL, loss_mask_BxL, parallel_B)


def caption_loss(logits_BxLxV, tokens_BxL, loss_mask_BxL, parallel_B=None):
  """Token-mean cross-entropy where loss_mask is 1 (open_clip's CoCa: ignore_index = pad)."""
  w_BxL = loss_mask_BxL.astype(jnp.float32)
  ce_BxL = optax.softmax_cross_entropy_with_integer_labels(logits_BxLxV, tokens_BxL)
  count = jnp.maximum(jnp.sum(w_BxL), 1.0)
  loss = jnp.sum(ce_BxL * w_BxL) / count
  correct = (jnp.argmax(logits_BxLxV, -1) == tokens_BxL).astype(jnp.float32)
  metrics = {'decoder/loss': loss, 'decoder/token_acc': jnp.sum(correct * w_BxL) / count}
  if parallel_B is not None:
    metrics['decoder/parallel_frac'] = jnp.mean(parallel_B.astype(jnp.float32))
  return loss, metrics
