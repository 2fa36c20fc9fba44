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


def get_model(model_config: Any, mesh=None) -> nn.Module:
  """Builds the model `model_config.name` from the config's other fields, over `mesh` (the
  device mesh its layers with their own collectives use: MoE expert dispatch).

  Raises ValueError (before any compilation) for an unknown model name, an
  unknown field or a bad tower variant.
  """
  cfg = _to_plain(model_config)
  name = cfg.pop('name', None)
  if name not in MODELS:
    raise ValueError(f'Unknown model name {name!r}; valid: {sorted(MODELS)}')
  cls = MODELS[name]
  if 'mesh' in cfg:
    raise ValueError("The model config may not set 'mesh': it is the run's device mesh, "
                     'which setup passes (models.get_model(config.model, mesh)).')
  fields = {f.name for f in dataclasses.fields(cls)} - {'parent', 'name', 'mesh'}
  unknown = sorted(set(cfg) - fields)
  if unknown:
    raise ValueError(f'Unknown field(s) {unknown} for model {name!r}; '
                     f'valid: {sorted(fields)}')
  return cls(**cfg, mesh=mesh)


__all__ = ['MODELS', 'get_model', 'LIMoE', 'TwoTowers', 'ViT', 'TextTransformer']


def summarize(model_config: Any, image_size: int, text_len: int, batch: int = 8) -> dict:
  """Sizes of a model from shapes only (jax.eval_shape; nothing is allocated):

  total_params; active_params: those one token meets, i.e. total minus the (E - k) experts
  of every MoE layer it skips; forward_flops: XLA's cost analysis of `apply` on `batch`
  (image, text) pairs, divided by `batch` (a batch, so MoE groups and capacities are like
  training's; a train step costs about 3x).
  """
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmcl.models import moe, transformer  # pylint: disable=g-import-not-at-top
  from mmcl import tree  # pylint: disable=g-import-not-at-top
  cfg = _to_plain(model_config)
  model = get_model(cfg)
  image = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  text = jax.ShapeDtypeStruct((batch, text_len), jnp.int32)
  params = jax.eval_shape(lambda i, t: model.init(jax.random.key(0), i, t)['params'],
                          image, text)
  # Which MoE spec governs which parameters: LIMoE has one, a two-tower model one per tower.
  specs = ({'Transformer/': cfg.get('moe') or {}} if cfg['name'] == 'limoe' else
           {'img/': (cfg.get('image') or {}).get('moe'), 'txt/': (cfg.get('text') or {}).get('moe')})
  skipped = 0
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    name = tree.path_str(path)
    if '/moe/' in name and name.rsplit('/', 1)[-1] in ('wi', 'bi', 'wo', 'bo'):
      spec = moe.MoeSpec.make(next(s for p, s in specs.items() if name.startswith(p) and s))
      skipped += leaf.size // spec.num_experts * (spec.num_experts - spec.k)
  total = transformer.count_params(params)
  cost = jax.jit(lambda p, i, t: model.apply({'params': p}, i, t)).lower(
      params, image, text).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return {'total_params': total, 'active_params': total - skipped,
          'forward_flops': float(cost['flops']) / batch}
