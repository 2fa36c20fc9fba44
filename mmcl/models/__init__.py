"""Models: ViT and text towers, the two-tower contrastive model, and LIMoE."""
import dataclasses
from typing import Any, Mapping

import flax.linen as nn

from mmcl.models.limoe import LIMoE
from mmcl.models.text import TextTransformer
from mmcl.models.two_towers import TwoTowers
from mmcl.models.vit import ViT

MODELS = {'two_towers': TwoTowers, 'limoe': LIMoE}


def _to_plain(x):
  """ConfigDict / FrozenDict / nested mappings -> plain dicts."""
  if hasattr(x, 'to_dict'):
    x = x.to_dict()
  if isinstance(x, Mapping):
    return {k: _to_plain(v) for k, v in x.items()}
  return x


def get_model(model_config: Any) -> nn.Module:
  """Builds the model `model_config.name` from the config's other fields.

  Raises ValueError (before any compilation) for an unknown model name, an
  unknown field or a bad tower variant.
  """
  cfg = _to_plain(model_config)
  name = cfg.pop('name', None)
  if name not in MODELS:
    raise ValueError(f'Unknown model name {name!r}; valid: {sorted(MODELS)}')
  cls = MODELS[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name'}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} for model {name!r}; '
                     f'valid: {sorted(fields)}')
  return cls(**cfg)


__all__ = ['MODELS', 'get_model', 'LIMoE', 'TwoTowers', 'ViT', 'TextTransformer']
