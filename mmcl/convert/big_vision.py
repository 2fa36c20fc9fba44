"""big_vision SigLIP / two-tower `.npz` -> mmcl `TwoTowers` params and config.

big_vision saves flat '/'-joined names ('params/img/Transformer/encoderblock_0/...', 'params/txt/
...', 'params/t', 'params/b'; the 'params/' prefix is optional here). mmcl's towers use big_vision's
module names, so the mapping is: the text token embedding 'txt/Embed_0' -> 'txt/embedding',
scanned encoders ('Transformer/encoderblock/...' with a leading depth axis) unstacked into
'encoderblock_<i>', `t` and `b` from shape [1] to scalars, a tower without a head gets an exact
identity head (when its width is the embedding size). Everything else keeps its name and layout,
and the result is checked name by name and shape by shape against the mmcl model: a tensor left
over or missing is an error that names it.

The config comes from the shapes: widths, depths, heads (the attention kernels are [D, H, Dh]),
MLP widths, patch and image size, vocab, text length, embedding size; image pooling 'map' (a
MAPHead_0), 'tok' (a cls token) or 'gap'; text pooling 'map' or `text_pool` (big_vision's default
'last'). big_vision's defaults match mmcl's: tanh GELU, LayerNorm eps 1e-6, bidirectional text.
"""
import math
import re
from typing import Mapping, NamedTuple

import numpy as np

from mmcl import tree
from mmcl.convert import io
from mmcl.convert import open_clip as oc_lib
from mmcl.models import posemb
from mmcl.models import transformer


class Imported(NamedTuple):
  model_config: dict  # mmcl: models.get_model(model_config)
  params: dict  # The 'params' collection: {'img', 'txt', 't'[, 'b']}.
  image_size: int
  context_length: int


def _tower_shapes(flat, tower):
  """Depth, width, heads, MLP width of one tower's encoder."""
  blocks = {int(m.group(1)) for n in flat
            if (m := re.match(rf'{tower}/Transformer/encoderblock_(\d+)/', n))}
  if not blocks or blocks != set(range(len(blocks))):
    raise ValueError(f'{tower}: encoder blocks missing or not numbered 0..N-1: {sorted(blocks)}')
  pre = f'{tower}/Transformer/encoderblock_0'
  d, h, _ = flat[f'{pre}/MultiHeadDotProductAttention_0/query/kernel'].shape
  return dict(depth=len(blocks), width=int(d), num_heads=int(h),
              mlp_dim=int(flat[f'{pre}/MlpBlock_0/Dense_0/kernel'].shape[1]))


def import_big_vision(weights: str | Mapping[str, np.ndarray], *, text_pool: str = 'last',
                      sticky_eos: int | None = 1, check: bool = True,
                      resize_to: int | None = None, resample: str = 'bilinear') -> Imported:
  """A big_vision two-tower checkpoint (`.npz` path or flat dict) -> mmcl config and params.

  `sticky_eos`: big_vision's SigLIP texts are padded with EOS (`eos="sticky", pad_value=1`);
  mmcl's tokenizers pad with 0, so the text tower embeds pads as this id (`pad_as`). None: off.
  `resize_to`: another image size; the position embedding is resampled to its grid (bilinear,
  as big_vision's `resample_posemb`; mmcl/models/posemb.py).
  """
  source = weights if isinstance(weights, str) else 'npz'
  sd = io.load_state_dict(weights) if isinstance(weights, str) else {
      k: np.asarray(v, np.float32) for k, v in weights.items()}
  # Scanned encoders ('Transformer/encoderblock/X' [depth, ...]) -> 'encoderblock_<i>/X'.
  flat = tree.flatten(transformer.unstack_blocks(
      tree.unflatten({k.removeprefix('params/'): v for k, v in sd.items()})))
  for need in ('img/embedding/kernel', 'img/pos_embedding', 'txt/Embed_0/embedding',
               'txt/pos_embedding', 't'):
    if need not in flat:
      raise KeyError(f'{source}: missing tensor {need!r}; not a big_vision two-tower '
                     f'checkpoint? (names: {sorted(flat)[:8]} ...)')
  flat['txt/embedding/embedding'] = flat.pop('txt/Embed_0/embedding')
  for k in ('t', 'b'):
    if k in flat:
      flat[k] = flat[k].reshape(())

  p, _, _, width = flat['img/embedding/kernel'].shape
  grid = math.isqrt(flat['img/pos_embedding'].shape[1])
  if grid * grid != flat['img/pos_embedding'].shape[1]:
    raise ValueError(f'img/pos_embedding has {flat["img/pos_embedding"].shape[1]} positions: '
                     'not a square grid (sincos2d posemb is not supported).')
  image = dict(_tower_shapes(flat, 'img'), patch_size=int(p))
  image['pool'] = ('map' if 'img/MAPHead_0/probe' in flat else
                   'tok' if 'img/cls' in flat else 'gap')
  vocab = flat['txt/embedding/embedding'].shape[0]
  length = flat['txt/pos_embedding'].shape[1]
  text = dict(_tower_shapes(flat, 'txt'), vocab_size=int(vocab), max_len=int(length),
              style='siglip', pool='map' if 'txt/MAPHead_0/probe' in flat else text_pool)
  if sticky_eos is not None:
    text['pad_as'] = int(sticky_eos)

  dims = {t: flat[f'{t}/head/kernel'].shape[1] for t in ('img', 'txt')
          if f'{t}/head/kernel' in flat}
  if len(set(dims.values())) > 1:
    raise ValueError(f'Image and text heads differ in size {dims}; mmcl has one embed_dim.')
  embed = next(iter(dims.values()), None) or image['width']
  for t, hp in (('img', image), ('txt', text)):
    if t not in dims:  # No head in big_vision (out_dim 0): the identity is exact.
      if hp['width'] != embed:
        raise ValueError(f'{t} has no head and width {hp["width"]} != embed dim {embed}.')
      flat[f'{t}/head/kernel'] = np.eye(embed, dtype=np.float32)
      flat[f'{t}/head/bias'] = np.zeros([embed], np.float32)

  cfg = dict(name='two_towers', image=image, text=text, embed_dim=int(embed),
             temperature_init=float(np.exp(flat['t'])))
  if 'b' in flat:
    cfg['bias_init'] = float(flat['b'])
  params = tree.unflatten(flat)
  size = grid * int(p)
  if resize_to is not None and resize_to != size:
    params, size = posemb.to_image_size(params, int(p), resize_to, resample), int(resize_to)
  if check:
    io.check_params(params, oc_lib.abstract_params(cfg, size, int(length)), f'{source} tensors')
  return Imported(cfg, params, size, int(length))
