"""open_clip / OpenAI CLIP ViT two-tower weights <-> mmcl `TwoTowers` params.

Import: a state dict (`.safetensors`, or `.pt`/`.bin` with torch) -> (mmcl model config, params,
open_clip config). The open_clip config (`{"embed_dim", "vision_cfg", "text_cfg", ...}`, the JSON
format of open_clip's `model_configs/`) may be given; what the tensor shapes tell (widths, depths,
patch and image size, context length, vocab, embed dim, MLP width, ln_pre, projection bias, logit
bias) is read from them and must agree with it. What shapes cannot tell comes from the config or
open_clip's defaults: heads (width / head_width, default 64), quick_gelu (OpenAI's models),
pool_type, no_causal_mask, act_kwargs and norm_kwargs (torch's LayerNorm eps 1e-5).

Export: mmcl params -> an open_clip state dict + config, which `open_clip.create_model` (with the
config registered or passed as a model_cfg) and `load_state_dict` accept. A model open_clip cannot
express (no class token, MAP pooling, MoE, ...) is refused with the reason.

One table of rules (`_rules`) drives both directions, so import and export cannot drift apart.
"""
import json
import math
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np

from mmcl import fs
from mmcl import tree
from mmcl.convert import io
from mmcl.convert.open_clip_config import (  # noqa: F401  (infer_config: the converter's API)
    HEAD_WIDTH, TEXT_POOLS, TORCH_LN_EPS, image_size, infer_config, model_config)
from mmcl.models import posemb
from mmcl.models import text as text_lib
from mmcl.models import vit

class Rule(NamedTuple):
  """Tensors `torch` (open_clip names) <-> params `mmcl` ('/'-joined), both ways."""
  torch: tuple[str, ...]
  mmcl: tuple[str, ...]
  to_mmcl: Callable[..., tuple]
  to_torch: Callable[..., tuple]


def _same(t, m):
  return Rule((t,), (m,), lambda x: (x,), lambda x: (x,))


def _linear(t, m):  # torch Linear [out, in] <-> flax Dense [in, out].
  return [Rule((f'{t}.weight',), (f'{m}/kernel',), lambda w: (w.T,), lambda k: (k.T,)),
          _same(f'{t}.bias', f'{m}/bias')]


def _ln(t, m):
  return [_same(f'{t}.weight', f'{m}/scale'), _same(f'{t}.bias', f'{m}/bias')]


def _attention(t, m, d, h):
  """nn.MultiheadAttention (packed in_proj [3D, D]) <-> flax q/k/v [D, H, Dh], out [H, Dh, D]."""
  dh, qkv = d // h, ('query', 'key', 'value')
  return [
      Rule((f'{t}.in_proj_weight',), tuple(f'{m}/{n}/kernel' for n in qkv),
           lambda w: tuple(w[i * d:(i + 1) * d].T.reshape(d, h, dh) for i in range(3)),
           lambda *ks: (np.concatenate([k.reshape(d, d).T for k in ks]),)),
      Rule((f'{t}.in_proj_bias',), tuple(f'{m}/{n}/bias' for n in qkv),
           lambda b: tuple(b[i * d:(i + 1) * d].reshape(h, dh) for i in range(3)),
           lambda *bs: (np.concatenate([b.reshape(d) for b in bs]),)),
      Rule((f'{t}.out_proj.weight',), (f'{m}/out/kernel',),
           lambda w: (w.T.reshape(h, dh, d),), lambda k: (k.reshape(d, d).T,)),
      _same(f'{t}.out_proj.bias', f'{m}/out/bias'),
  ]


def _encoder(t, m, depth, d, h):
  rules = []
  for i in range(depth):
    tb, mb = f'{t}.resblocks.{i}', f'{m}/encoderblock_{i}'
    rules += (_ln(f'{tb}.ln_1', f'{mb}/LayerNorm_0')
              + _attention(f'{tb}.attn', f'{mb}/MultiHeadDotProductAttention_0', d, h)
              + _ln(f'{tb}.ln_2', f'{mb}/LayerNorm_1')
              + _linear(f'{tb}.mlp.c_fc', f'{mb}/MlpBlock_0/Dense_0')
              + _linear(f'{tb}.mlp.c_proj', f'{mb}/MlpBlock_0/Dense_1'))
  return rules


def _rules(cfg: Mapping[str, Any], text_prefix: str = '') -> list[Rule]:
  """Every tensor of an open_clip CLIP (text at top level, or under 'text.' for CustomTextCLIP)."""
  vc, tc = cfg['vision_cfg'], cfg['text_cfg']
  d = vc['width']

  def patches_to_mmcl(ce_D, pos_NxD, w_DxCxPxP):
    # open_clip adds position 0 to the class token; mmcl's class token has no position.
    return ((ce_D + pos_NxD[0])[None, None], pos_NxD[None, 1:],
            w_DxCxPxP.transpose(2, 3, 1, 0), np.zeros([d], np.float32))

  def patches_to_torch(cls_1x1xD, pos_1xNxD, k_PxPxCxD, b_D):
    # open_clip's conv1 has no bias: fold mmcl's into the patch positions (exact).
    pos = np.concatenate([np.zeros([1, d], np.float32), pos_1xNxD[0] + b_D])
    return cls_1x1xD.reshape(d), pos, k_PxPxCxD.transpose(3, 2, 0, 1)

  rules = [Rule(('visual.class_embedding', 'visual.positional_embedding', 'visual.conv1.weight'),
                ('img/cls', 'img/pos_embedding', 'img/embedding/kernel', 'img/embedding/bias'),
                patches_to_mmcl, patches_to_torch)]
  if not vc.get('no_ln_pre', False):
    rules += _ln('visual.ln_pre', 'img/pre_norm')
  rules += _encoder('visual.transformer', 'img/Transformer', vc['layers'], d,
                    d // vc['head_width'])
  rules += _ln('visual.ln_post', 'img/Transformer/encoder_norm')
  rules.append(_same('visual.proj', 'img/head/kernel'))

  p, dt = text_prefix, tc['width']
  rules += [_same(f'{p}token_embedding.weight', 'txt/embedding/embedding'),
            Rule((f'{p}positional_embedding',), ('txt/pos_embedding',),
                 lambda x: (x[None],), lambda x: (x[0],))]
  rules += _encoder(f'{p}transformer', 'txt/Transformer', tc['layers'], dt, tc['heads'])
  rules += _ln(f'{p}ln_final', 'txt/Transformer/encoder_norm')
  if tc.get('proj_bias', False):
    rules += _linear(f'{p}text_projection', 'txt/head')
  else:
    rules.append(_same(f'{p}text_projection', 'txt/head/kernel'))
  scalar = lambda x: (np.asarray(x, np.float32).reshape(()),)
  rules.append(Rule(('logit_scale',), ('t',), scalar, scalar))
  if cfg.get('init_logit_bias') is not None:
    rules.append(Rule(('logit_bias',), ('b',), scalar, scalar))
  return rules


class Imported(NamedTuple):
  model_config: dict  # mmcl: models.get_model(model_config)
  params: dict  # The 'params' collection: {'img', 'txt', 't'[, 'b']}.
  open_clip_config: dict  # Full open_clip config; image_size and context_length live here.


def import_open_clip(weights: str | Mapping[str, np.ndarray], config: Mapping | None = None,
                     *, head_width: int = HEAD_WIDTH, quick_gelu: bool | None = None,
                     check: bool = True, resize_to: int | None = None,
                     resample: str = 'bilinear') -> Imported:
  """open_clip weights (a path or a flat state dict) -> mmcl model config and params.

  `config` is an open_clip model config dict or JSON path (optional; a hub
  `open_clip_config.json` with its "model_cfg" works too); `quick_gelu=True` for
  OpenAI's original weights (open_clip's '-quickgelu' names). Every tensor is mapped: a
  leftover or missing tensor is an error naming it. `check` also compares the params with
  `jax.eval_shape` of the mmcl model's init. `resize_to`: another image size to run at; the
  position embedding is resampled to its grid (open_clip's `resize_pos_embed` does it
  bicubically; `resample` picks, mmcl/models/posemb.py) and the config says the new size.
  """
  source = weights if isinstance(weights, str) else 'state dict'
  sd = io.load_state_dict(weights) if isinstance(weights, str) else {
      k: np.asarray(v, np.float32) for k, v in weights.items()}
  if isinstance(config, str):
    with fs.open(config) as f:
      config = json.load(f)
  config = dict(config or {})
  config = dict(config.get('model_cfg', config))  # HF hub open_clip_config.json nests it.
  if quick_gelu is not None:
    config['quick_gelu'] = quick_gelu
  cfg = infer_config(sd, config, head_width)
  mcfg = model_config(cfg)
  tensors = io.Tensors(sd, source)
  flat = {}
  for rule in _rules(cfg, 'text.' if cfg.get('custom_text') else ''):
    outs = rule.to_mmcl(*(tensors.take(n) for n in rule.torch))
    flat.update({m: np.asarray(x, np.float32) for m, x in zip(rule.mmcl, outs)})
  tensors.check_all_taken()
  mcfg['temperature_init'] = float(np.exp(flat['t']))
  params = tree.unflatten(flat)
  if resize_to is not None and resize_to != image_size(cfg):
    params = posemb.to_image_size(params, cfg['vision_cfg']['patch_size'], resize_to, resample)
    cfg['vision_cfg']['image_size'] = int(resize_to)
  if check:
    io.check_params(params, abstract_params(mcfg, image_size(cfg),
                                            cfg['text_cfg']['context_length']))
  return Imported(mcfg, params, cfg)


def abstract_params(model_cfg: Mapping, img_size: int, text_len: int):
  """Shapes of the mmcl model's params (nothing allocated)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmcl import models  # pylint: disable=g-import-not-at-top
  model = models.get_model(dict(model_cfg))
  image = jax.ShapeDtypeStruct((1, img_size, img_size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((1, text_len), jnp.int32)
  return jax.eval_shape(lambda i, t: model.init(jax.random.key(0), i, t)['params'], image, text)


def _plain(cfg):
  """ConfigDict / FrozenDict / dict -> a plain dict copy."""
  return json.loads(json.dumps(cfg.to_dict() if hasattr(cfg, 'to_dict') else cfg,
                               default=lambda x: x.to_dict() if hasattr(x, 'to_dict') else dict(x)))


def export_config(model_cfg: Mapping, params: Mapping, *, eos_id: int | None = None) -> dict:
  """The open_clip config of an mmcl two_towers model (refuses what open_clip cannot express)."""
  cfg = _plain(model_cfg)
  if cfg.get('name') != 'two_towers':
    raise ValueError(f'Only two_towers models export to open_clip, not {cfg.get("name")!r}.')
  im, tx = dict(cfg.get('image') or {}), dict(cfg.get('text') or {})
  for what, tower in (('image', im), ('text', tx)):
    if tower.get('moe'):
      raise ValueError(f'The {what} tower is a MoE tower: open_clip has no such model.')
  ih = vit.resolve_hparams(im.get('variant'), im.get('width'), im.get('depth'),
                           im.get('mlp_dim'), im.get('num_heads'), im.get('patch_size'))
  th = text_lib.resolve_hparams(tx.get('variant'), tx.get('width'), tx.get('depth'),
                                tx.get('mlp_dim'), tx.get('num_heads'))
  ipool = im.get('pool', 'gap')
  use_cls = ipool == 'tok' if im.get('class_token') is None else im['class_token']
  if not use_cls or ipool not in ('tok', 'gap'):
    raise ValueError(f'Image tower pool={ipool!r}, class_token={use_cls}: open_clip ViTs '
                     "always have a class token and pool 'tok' or 'avg' (mmcl 'gap'); "
                     "train with model.image.pool='tok' (or class_token=True) to export.")
  style = tx.get('style', 'siglip')
  tpool = tx.get('pool') or ('eot' if style == 'clip' else 'last')
  oc_pool = {v: k for k, v in TEXT_POOLS.items()}.get(tpool)
  if oc_pool is None:
    raise ValueError(f"Text pool {tpool!r}: open_clip pools 'argmax', 'last', 'first' or "
                     "'eos' (mmcl 'eot').")
  acts = {im.get('act', 'gelu_tanh'), tx.get('act', 'gelu_tanh')}
  if 'quick_gelu' in acts and len(acts) > 1:
    raise ValueError('open_clip sets quick_gelu for both towers at once; the towers differ.')
  grid = math.isqrt(params['img']['pos_embedding'].shape[1])

  def tower_extras(t):
    out = {}
    if t.get('act', 'gelu_tanh') == 'gelu_tanh':
      out['act_kwargs'] = {'approximate': 'tanh'}
    eps = t.get('ln_eps', 1e-6)
    if eps != TORCH_LN_EPS:
      out['norm_kwargs'] = {'eps': eps}
    return out

  vision = dict(image_size=grid * ih['patch_size'], layers=ih['depth'], width=ih['width'],
                patch_size=ih['patch_size'], head_width=ih['width'] // ih['num_heads'],
                mlp_ratio=ih['mlp_dim'] / ih['width'],
                pool_type='tok' if ipool == 'tok' else 'avg',
                no_ln_pre=not im.get('pre_norm', False), **tower_extras(im))
  text = dict(context_length=params['txt']['pos_embedding'].shape[1],
              vocab_size=tx.get('vocab_size', 32_000), width=th['width'], heads=th['num_heads'],
              layers=th['depth'], mlp_ratio=th['mlp_dim'] / th['width'], pool_type=oc_pool,
              no_causal_mask=style != 'clip', proj_bias=tx.get('head_bias', True),
              **tower_extras(tx))
  if tpool == 'eot':
    if eos_id is None:
      raise ValueError("Text pool 'eot' exports as open_clip pool_type 'eos': give eos_id "
                       "(the tokenizer's EOS id).")
    text['eos_id'] = int(eos_id)
  out = dict(embed_dim=cfg.get('embed_dim', 512), vision_cfg=vision, text_cfg=text)
  if 'quick_gelu' in acts:
    out['quick_gelu'] = True
  if 'b' in params:
    out['init_logit_bias'] = float(np.asarray(params['b']))
  return out


def export_open_clip(model_cfg: Mapping, params: Mapping, path: str | None = None, *,
                     eos_id: int | None = None):
  """mmcl params -> (open_clip state dict, open_clip config); written to `path`.safetensors and
  `path`.json when `path` (no extension) is given.

  Exact: the conv bias (open_clip has none) is folded into the patch positions; the exported
  logit_scale is `t` clamped at log(max_temperature) as the mmcl model uses it. A head bias
  open_clip cannot hold (image tower head_bias=True with a non-zero bias) is refused.
  """
  params = params.get('params', params)
  cfg = export_config(model_cfg, params, eos_id=eos_id)
  flat = {k: np.asarray(v, np.float32) for k, v in tree.flatten(params).items()}
  ibias = flat.pop('img/head/bias', None)
  if ibias is not None and np.any(ibias):
    raise ValueError('The image head has a non-zero bias; open_clip visual.proj has none '
                     '(train with image head_bias=False to export).')
  max_t = _plain(model_cfg).get('max_temperature')
  if max_t is not None:
    flat['t'] = np.minimum(flat['t'], np.float32(math.log(max_t)))
  mm = io.Tensors(flat, 'mmcl params')
  sd = {}
  for rule in _rules(cfg):
    outs = rule.to_torch(*(mm.take(m) for m in rule.mmcl))
    sd.update({t: np.asarray(x, np.float32) for t, x in zip(rule.torch, outs)})
  mm.check_all_taken()
  if path is not None:
    io.save_safetensors(path + '.safetensors', sd)
    with fs.open(path + '.json', 'w') as f:
      json.dump(cfg, f, indent=2)
  return sd, cfg


# open_clip's image normalisation for OpenAI-CLIP-trained weights (open_clip/constants.py);
# SigLIP-style models use mean = std = 0.5 (i.e. value_range(-1, 1)).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


def fold_normalization(params: Mapping, mean=OPENAI_MEAN, std=OPENAI_STD, *,
                       unfold: bool = False) -> dict:
  """Params whose image tower takes [0, 1] pixels instead of (x - mean) / std per channel.

  The patch embedding is linear with VALID padding, so the normalisation folds into its kernel
  and bias exactly (up to float rounding): k' = k / std[c], b' = b - sum k * mean[c] / std[c].
  Then mmcl's `value_range(0, 1)` pp op is the whole image preprocessing. `unfold=True` undoes
  it (do that before exporting to open_clip, whose preprocessing normalises).
  """
  out = tree.unflatten(tree.flatten(params))  # New dicts; the other arrays are shared.
  emb = out['img']['embedding']
  k_PxPxCxD, b_D = np.asarray(emb['kernel'], np.float32), np.asarray(emb['bias'], np.float32)
  mean_C, std_C = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if unfold:
    k_PxPxCxD = k_PxPxCxD * std_C[:, None]
    b_D = b_D + np.einsum('pqcd,c->d', k_PxPxCxD, mean_C / std_C)
  else:
    b_D = b_D - np.einsum('pqcd,c->d', k_PxPxCxD, mean_C / std_C)
    k_PxPxCxD = k_PxPxCxD / std_C[:, None]
  out['img']['embedding'] = {'kernel': k_PxPxCxD, 'bias': b_D}
  return out
