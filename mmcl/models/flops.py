"""Analytic FLOP counts of the towers, from hyperparameters alone (checks XLA's cost analysis).

Counts matmul FLOPs (2 per multiply-add) of one (image, text) example: the dense layers and
attention scores/values of each encoder block, patch embedding, pooling heads, output heads,
and for MoE layers the router, the dispatch/combine einsums and the experts at capacity.
Element-wise work (LayerNorm, GELU, softmax, the optimizer) is left out: XLA's count is a few
percent higher. A train step is 3x the forward (weight and input gradients), except the
patch embedding, whose input needs no gradient (2x). A train step also counts what only
training runs: FLIP patch dropout's fewer image tokens and the captioning decoder.
`mmcl/train/config_flops.py` counts a whole config: NaFlex's budget of patch tokens and
SigLIP 2's self-distillation passes too. `mmcl.models.summarize` gives XLA's forward count
of the built model; tests compare the two.
"""
import math
from typing import Any

import jax
import jax.numpy as jnp

from mmcl import models
from mmcl.models import decoder as decoder_lib
from mmcl.models import moe as moe_lib
from mmcl.models import patch_dropout
from mmcl.models import text as text_lib
from mmcl.models import vit


def _plain(cfg) -> dict:
  return dict(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg or {})


def block_flops(tokens: int, width: int, mlp_dim: int, kv_tokens: int | None = None) -> dict:
  """Forward FLOPs of one pre-norm encoder block over `tokens` tokens: attention, MLP."""
  kv = tokens if kv_tokens is None else kv_tokens
  attn = 2 * tokens * width * width * 2 + 2 * kv * width * width * 2  # q, out; k, v.
  attn += 2 * tokens * kv * width * 2  # Scores q.k and the weighted sum of values.
  return {'attention': attn, 'mlp': 2 * tokens * width * mlp_dim * 2}


def moe_mlp_flops(tokens: int, width: int, mlp_dim: int, spec, group_size: int) -> float:
  """Forward FLOPs of a MoE layer's MLP part over `tokens` tokens in groups of `group_size`:
  router, one-hot dispatch and combine einsums, E experts x capacity slots per group."""
  spec = moe_lib.MoeSpec.make(spec)
  e, h = spec.num_experts, spec.mlp_dim or mlp_dim
  groups, capacity = tokens / group_size, spec.capacity(group_size, train=True)
  router = 2 * tokens * width * e
  dispatch_combine = 2 * (2 * groups * group_size * e * capacity * width)
  experts = groups * e * capacity * 2 * width * h * 2
  return router + dispatch_combine + experts


def encoder_flops(tokens: int, width: int, depth: int, mlp_dim: int, moe=None,
                  group_size: int | None = None) -> float:
  """Forward FLOPs of `depth` blocks; the MoE layers of `moe` (a MoeSpec dict) replace the
  dense MLP. `group_size`: tokens per routing group (default: the spec's)."""
  moe_layers = moe_lib.MoeSpec.make(moe).layer_ids(depth) if moe else ()
  block = block_flops(tokens, width, mlp_dim)
  total = 0.0
  for i in range(depth):
    if i in moe_layers:
      spec = moe_lib.MoeSpec.make(moe)
      s = group_size or moe_lib.group_size_for(tokens, spec.group_size)
      total += block['attention'] + moe_mlp_flops(tokens, width, mlp_dim, spec, s)
    else:
      total += block['attention'] + block['mlp']
  return total


def _map_head_flops(tokens: int, width: int, mlp_dim: int) -> float:
  b = block_flops(1, width, mlp_dim, kv_tokens=tokens)
  return b['attention'] + b['mlp']


def _kept(patches: int, ratio, train: bool) -> int:
  """Image tokens after FLIP patch dropout (training only)."""
  return patch_dropout.kept_count(patches, ratio) if train and ratio else patches


def two_towers_forward(model: Any, image_size: int, text_len: int, train: bool = False,
                       patches: int | None = None) -> dict[str, float]:
  """{'image', 'text', 'decoder', 'patch_embedding'} forward FLOPs per example of a TwoTowers
  config ('image' includes its patch embedding). `train`: the training forward (patch
  dropout's kept tokens; the decoder, else 0). `patches`: patch tokens per image if not
  (image_size / patch)^2 (NaFlex: the budget, padding included)."""
  m = _plain(model)
  embed = m.get('embed_dim', 512)
  img = _plain(m.get('image'))
  hp = vit.resolve_hparams(img.get('variant'), img.get('width'), img.get('depth'),
                           img.get('mlp_dim'), img.get('num_heads'), img.get('patch_size'))
  d, p = hp['width'], hp['patch_size']
  patches = patches or (image_size // p)**2
  pool = img.get('pool', 'gap')
  cls = pool == 'tok' if img.get('class_token') is None else img['class_token']
  tokens = _kept(patches, img.get('patch_dropout'), train) + int(bool(cls))
  patch = 2 * patches * p * p * 3 * d
  image = patch + encoder_flops(tokens, d, hp['depth'], hp['mlp_dim'], img.get('moe'))
  image += (_map_head_flops(tokens, d, hp['mlp_dim']) if pool == 'map' else 0) + 2 * d * embed
  image_width = d

  txt = _plain(m.get('text'))
  hp = text_lib.resolve_hparams(txt.get('variant'), txt.get('width'), txt.get('depth'),
                                txt.get('mlp_dim'), txt.get('num_heads'))
  d = hp['width']
  text = encoder_flops(text_len, d, hp['depth'], hp['mlp_dim'], txt.get('moe'))
  text += (_map_head_flops(text_len, d, hp['mlp_dim']) if txt.get('pool') == 'map' else 0)
  text += 2 * d * embed
  dec = _plain(m.get('decoder')) if train and m.get('decoder') else None
  decoder = decoder_forward(dec, tokens, image_width) if dec else 0.0
  return {'image': image, 'text': text, 'decoder': decoder, 'patch_embedding': patch}


def decoder_forward(dec: dict, image_tokens: int, image_width: int) -> float:
  """Forward FLOPs per example of a TextDecoder config over `image_tokens` image tokens:
  causal self-attention and MLP blocks, cross-attention (keys and values projected from the
  image width), and the vocabulary head."""
  hp = decoder_lib.TextDecoder(**dec).hparams()
  length, w = dec.get('max_len', 64), hp['width']
  block = block_flops(length, w, hp['mlp_dim'])
  cross = 2 * length * w * w * 2 + 2 * image_tokens * image_width * w * 2
  cross += 2 * length * image_tokens * w * 2
  return hp['depth'] * (block['attention'] + block['mlp'] + cross) + 2 * length * w * dec[
      'vocab_size']


def limoe_forward(model: Any, image_size: int, text_len: int, local_batch: int = 1024,
                  train: bool = False) -> dict[str, float]:
  """Like two_towers_forward for a LIMoE config: one shared encoder over both modalities.
  Routing groups are taken over `local_batch` examples (a device's share), as in training."""
  m = _plain(model)
  hp = vit.resolve_hparams(m.get('variant'), m.get('width'), m.get('depth'), m.get('mlp_dim'),
                           m.get('num_heads'), m.get('patch_size'))
  d, p, embed, moe = hp['width'], hp['patch_size'], m.get('embed_dim', 512), m.get('moe')
  spec = moe_lib.MoeSpec.make(moe)
  out = {'patch_embedding': 2 * (image_size // p)**2 * p * p * 3 * d}
  image_tokens = _kept((image_size // p)**2, m.get('patch_dropout'), train)
  for name, tokens in (('image', image_tokens), ('text', text_len)):
    group = moe_lib.group_size_for(local_batch * tokens, spec.group_size)
    out[name] = encoder_flops(tokens, d, hp['depth'], hp['mlp_dim'], moe, group) + 2 * d * embed
  out['image'] += out['patch_embedding']
  if m.get('image_pool') == 'map':
    out['image'] += _map_head_flops(image_tokens, d, hp['mlp_dim'])
  return {**out, 'decoder': 0.0}


def loss_forward(global_batch: int, embed_dim: int, directions: int = 2) -> float:
  """Per-example FLOPs of the logits: each row against all B columns, per direction."""
  return 2 * global_batch * embed_dim * directions


def train_step_flops(model: Any, image_size: int, text_len: int, global_batch: int,
                     local_batch: int | None = None,
                     patches: int | None = None) -> dict[str, float]:
  """Per-example FLOPs of a train step: {'forward', 'train', 'image', 'text', 'decoder',
  'loss'} (the towers' training forward: patch dropout's kept tokens, the decoder).

  train = 3 x (towers + decoder + logits) - the patch embedding's input gradient.
  """
  m = _plain(model)
  if m.get('name', 'two_towers') == 'limoe':
    fwd = limoe_forward(m, image_size, text_len, local_batch or global_batch, train=True)
  else:
    fwd = two_towers_forward(m, image_size, text_len, train=True, patches=patches)
  loss = loss_forward(global_batch, m.get('embed_dim', 512))
  forward = fwd['image'] + fwd['text'] + fwd['decoder'] + loss
  return {'forward': forward, 'train': 3 * forward - fwd['patch_embedding'],
          'image': fwd['image'], 'text': fwd['text'], 'decoder': fwd['decoder'], 'loss': loss}


def dino_head_flops(width: int, hidden: int, bottleneck: int, prototypes: int) -> float:
  """Forward FLOPs of one vector through a DinoHead (mmcl/models/distill_heads.py)."""
  return 2 * (width * hidden + hidden * hidden + hidden * bottleneck + bottleneck * prototypes)


def param_count(model: Any, image_size: int, text_len: int) -> int:
  """Parameters of a model config, from shapes only (jax.eval_shape; nothing allocated)."""
  net = models.get_model(model)
  image = jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((1, text_len), jnp.int32)
  params = jax.eval_shape(lambda i, t: net.init(jax.random.key(0), i, t)['params'], image, text)
  return sum(math.prod(x.shape) for x in jax.tree.leaves(params))
