"""open_clip's model config (the JSON of its `model_configs/`) <-> mmcl's two_towers config.

`infer_config` reads what a state dict's tensor shapes tell and checks it against a given
config; `model_config` maps the full config to mmcl's, refusing features mmcl lacks.
"""
import json
import math
from typing import Any, Mapping

import numpy as np

HEAD_WIDTH = 64  # open_clip's vision head_width default.
TORCH_LN_EPS = 1e-5

# open_clip config fields mmcl cannot represent, with the values that are fine.
_UNSUPPORTED = {
    'vision_cfg': dict(ls_init_value=(None,), attentional_pool=(False,),
                       final_ln_after_pool=(False,), pos_embed_type=('learnable',),
                       timm_model_name=(None,)),
    'text_cfg': dict(ls_init_value=(None,), embed_cls=(False,), final_ln_after_pool=(False,),
                     proj_type=('linear',), hf_model_name=(None,)),
}
_ATTN_UNSUPPORTED = ('qk_norm', 'scaled_cosine_attn', 'scale_heads', 'scale_attn_inner',
                     'scale_attn', 'scale_fc')
TEXT_POOLS = {'argmax': 'argmax', 'last': 'last', 'first': 'first', 'eos': 'eot'}


def _count_blocks(names, prefix):
  ids = {int(n[len(prefix):].split('.')[0]) for n in names if n.startswith(prefix)}
  if ids != set(range(len(ids))):
    raise ValueError(f'Blocks under {prefix!r} are not numbered 0..N-1: {sorted(ids)}')
  return len(ids)


def _agree(given: dict, inferred: dict, where: str) -> dict:
  """`given` plus `inferred`; a given value that contradicts the shapes is an error."""
  out = dict(given)
  for k, v in inferred.items():
    g = given.get(k)
    if k == 'image_size' and isinstance(g, (list, tuple)):
      g = g[0] if len(set(g)) == 1 else g
    if g is not None and g != v:
      raise ValueError(f'{where}.{k}={g!r} in the given config, but the tensors say {v!r}.')
    out[k] = v
  return out


def infer_config(sd: Mapping[str, np.ndarray], cfg: Mapping | None = None,
                 head_width: int = HEAD_WIDTH) -> dict:
  """The full open_clip config of state dict `sd`: shapes, plus `cfg` for what they cannot tell."""
  cfg = json.loads(json.dumps(cfg or {}))  # A deep, plain copy.
  names = list(sd)
  if 'visual.conv1.weight' not in sd:
    vis = sorted({n.split('.')[1] for n in names if n.startswith('visual.')})
    raise ValueError('Not an open_clip ViT image tower (no visual.conv1.weight); modified-'
                     f'ResNet / timm towers are not supported. visual.* holds: {vis}')
  tp = 'text.' if 'text.token_embedding.weight' in sd else ''
  if tp + 'token_embedding.weight' not in sd:
    raise ValueError('No open_clip text Transformer (token_embedding.weight); HF text '
                     'towers are not supported.')
  width, _, patch, _ = sd['visual.conv1.weight'].shape
  n_pos = sd['visual.positional_embedding'].shape[0]
  grid = math.isqrt(n_pos - 1)
  if grid * grid != n_pos - 1:
    raise ValueError(f'visual.positional_embedding has {n_pos} rows: not 1 + a square grid.')
  vc = cfg.get('vision_cfg', {})
  hw = vc.get('head_width', head_width)
  if width % hw:
    raise ValueError(f'Vision width {width} is not a multiple of head_width {hw}; give '
                     'vision_cfg.head_width.')
  mlp = sd['visual.transformer.resblocks.0.mlp.c_fc.weight'].shape[0]
  if 'mlp_ratio' in vc and int(width * vc['mlp_ratio']) != mlp:
    raise ValueError(f'vision_cfg.mlp_ratio={vc["mlp_ratio"]} but the MLP width is {mlp}.')
  cfg['vision_cfg'] = _agree(vc, dict(
      width=int(width), patch_size=int(patch), image_size=int(grid * patch), head_width=hw,
      layers=_count_blocks(names, 'visual.transformer.resblocks.'),
      no_ln_pre='visual.ln_pre.weight' not in sd), 'vision_cfg')
  cfg['vision_cfg'].setdefault('mlp_ratio', mlp / width)

  tc = cfg.get('text_cfg', {})
  vocab, twidth = sd[tp + 'token_embedding.weight'].shape
  proj_bias = tp + 'text_projection.weight' in sd
  proj = sd[tp + 'text_projection.weight'].T if proj_bias else sd[tp + 'text_projection']
  heads = tc.get('heads', twidth // head_width)
  tmlp = sd[f'{tp}transformer.resblocks.0.mlp.c_fc.weight'].shape[0]
  if 'mlp_ratio' in tc and int(twidth * tc['mlp_ratio']) != tmlp:
    raise ValueError(f'text_cfg.mlp_ratio={tc["mlp_ratio"]} but the MLP width is {tmlp}.')
  cfg['text_cfg'] = _agree(tc, dict(
      vocab_size=int(vocab), width=int(twidth), heads=int(heads), proj_bias=proj_bias,
      context_length=int(sd[tp + 'positional_embedding'].shape[0]),
      layers=_count_blocks(names, f'{tp}transformer.resblocks.')), 'text_cfg')
  cfg['text_cfg'].setdefault('mlp_ratio', tmlp / twidth)
  embed = int(proj.shape[1])
  if sd['visual.proj'].shape[1] != embed:
    raise ValueError(f'visual.proj gives embed dim {sd["visual.proj"].shape[1]}, the text '
                     f'projection {embed}.')
  cfg = _agree(cfg, {'embed_dim': embed}, 'config')
  if 'logit_bias' in sd:
    cfg['init_logit_bias'] = float(np.asarray(sd['logit_bias']).reshape(()))
  elif cfg.get('init_logit_bias') is not None:
    raise ValueError('The config sets init_logit_bias but there is no logit_bias tensor.')
  if tp:
    cfg['custom_text'] = True
  return cfg


def _act(cfg, tower):
  kw = dict(cfg[tower].get('act_kwargs') or {})
  if cfg.get('quick_gelu', False):
    if kw:
      raise ValueError(f'quick_gelu with {tower}.act_kwargs={kw} is not supported.')
    return 'quick_gelu'
  approx = kw.pop('approximate', 'none')
  if kw or approx not in ('none', 'tanh'):
    raise ValueError(f'Unsupported {tower}.act_kwargs {cfg[tower]["act_kwargs"]}.')
  return 'gelu_tanh' if approx == 'tanh' else 'gelu'


def _ln_eps(cfg, tower):
  kw = dict(cfg[tower].get('norm_kwargs') or {})
  eps = kw.pop('eps', TORCH_LN_EPS)
  if kw:
    raise ValueError(f'Unsupported {tower}.norm_kwargs {cfg[tower]["norm_kwargs"]}.')
  return float(eps)


def model_config(cfg: Mapping[str, Any]) -> dict:
  """The mmcl two_towers model config of a full open_clip config (see `infer_config`)."""
  for tower, bad in _UNSUPPORTED.items():
    tcfg = cfg[tower]
    found = {k: tcfg[k] for k, ok in bad.items() if k in tcfg and tcfg[k] not in ok}
    found.update({k: tcfg[k] for k in _ATTN_UNSUPPORTED if tcfg.get(k)})
    if tcfg.get('block_type') not in (None, 'default'):
      found['block_type'] = tcfg['block_type']
    if found:
      raise ValueError(f'open_clip {tower} features mmcl does not implement: {found}')
  vc, tc = cfg['vision_cfg'], cfg['text_cfg']
  if vc.get('pool_type', 'tok') not in ('tok', 'avg'):
    raise ValueError(f'vision_cfg.pool_type={vc["pool_type"]!r}; mmcl has tok and avg.')
  pool = tc.get('pool_type', 'argmax')
  if pool not in TEXT_POOLS:
    raise ValueError(f'text_cfg.pool_type={pool!r}; mmcl has {sorted(TEXT_POOLS)}.')
  # 'eos' becomes mmcl 'eot' (the last non-pad token): the same while the tokenizer ends every
  # text with its EOS and pads with 0, as mmcl's tokenizers do.
  image = dict(
      width=vc['width'], depth=vc['layers'], num_heads=vc['width'] // vc['head_width'],
      mlp_dim=int(vc['width'] * vc['mlp_ratio']), patch_size=vc['patch_size'],
      pool='tok' if vc.get('pool_type', 'tok') == 'tok' else 'gap', class_token=True,
      pre_norm=not vc.get('no_ln_pre', False), head_bias=False,
      act=_act(cfg, 'vision_cfg'), ln_eps=_ln_eps(cfg, 'vision_cfg'))
  text = dict(
      width=tc['width'], depth=tc['layers'], num_heads=tc['heads'],
      mlp_dim=int(tc['width'] * tc['mlp_ratio']), vocab_size=tc['vocab_size'],
      max_len=tc['context_length'], style='siglip' if tc.get('no_causal_mask') else 'clip',
      pool=TEXT_POOLS[pool], head_bias=bool(tc.get('proj_bias', False)),
      act=_act(cfg, 'text_cfg'), ln_eps=_ln_eps(cfg, 'text_cfg'))
  out = dict(name='two_towers', image=image, text=text, embed_dim=cfg['embed_dim'])
  if cfg.get('init_logit_bias') is not None:
    out['bias_init'] = float(cfg['init_logit_bias'])
  return out


def image_size(cfg: Mapping[str, Any]) -> int:
  s = cfg['vision_cfg']['image_size']
  return int(s[0] if isinstance(s, (list, tuple)) else s)
