"""NaFlex training (SigLIP 2, docs/resolution.md): `config.naflex.budget = L` switches a run
to images at their own aspect ratio, each as up to L patches.

The input pipeline then ends with `patchify_naflex(p, L)` (mmcl/data/pp_naflex.py; p the
image tower's patch size; placed before a trailing keep(), which keeps the patch keys too),
so the batch holds patches [B, L, p*p*3] under 'image' and their positions and mask; the
train step passes that patch dict to the ViT (mmcl/models/vit.py).
The rest of config.input.pp should not resize to a square, or the aspect ratio is gone.
"""
import numpy as np

from mmcl.data import pp_naflex
from mmcl.models import naflex
from mmcl.models import vit


def budget(config) -> int | None:
  """config.naflex.budget (None or 0: NaFlex off)."""
  return (config.get('naflex') or {}).get('budget') or None


def patch_size(config) -> int:
  img = dict(config.model.get('image') or {})
  return vit.resolve_hparams(img.get('variant'), img.get('width'), img.get('depth'),
                             img.get('mlp_dim'), img.get('num_heads'),
                             img.get('patch_size'))['patch_size']


def example_shapes(config, length: int | None = None) -> dict:
  """{batch key: (shape, dtype)} of one NaFlex example at budget `length` (the config's)."""
  length = length or budget(config)
  p = patch_size(config)
  return {'image': ((length, p * p * 3), np.float32),
          naflex.ROWS: ((length,), np.int32), naflex.COLS: ((length,), np.int32),
          naflex.MASK: ((length,), np.bool_), naflex.GRID: ((2,), np.int32)}


def train_pp(pp: str, config) -> str:
  """The training pp string `pp` yielding NaFlex patches at the config's budget (each
  example at a budget drawn from config.naflex.draw when set): pp_naflex.with_patchify."""
  return pp_naflex.with_patchify(pp, patch_size(config), budget(config),
                                 tuple((config.get('naflex') or {}).get('draw') or ()))


def check(config):
  """NaFlex config errors, before anything compiles."""
  length = budget(config)
  if length is None:
    return
  if not isinstance(length, int) or length <= 0:
    raise ValueError(f'config.naflex.budget={length!r} must be a positive int (the patch '
                     'tokens per image) or None (off).')
  draw = tuple((config.get('naflex') or {}).get('draw') or ())
  if draw and not all(isinstance(b, int) and 0 < b <= length for b in draw):
    raise ValueError(f'config.naflex.draw={draw} must be budgets in [1, config.naflex.budget='
                     f'{length}] (each example draws one; the batch is padded to the budget).')
  if config.model.name != 'two_towers':
    raise ValueError(f'config.naflex is for two_towers models (a ViT image tower), not '
                     f'config.model.name={config.model.name!r}.')
  img = dict(config.model.get('image') or {})
  clash = {'config.model.image.patch_dropout': img.get('patch_dropout'),
           'config.model.image.apply_patch_size': img.get('apply_patch_size'),
           'config.flexi_patch_sizes': tuple(config.get('flexi_patch_sizes', ()) or ()),
           'config.unmasked_from_step': config.get('unmasked_from_step', 0),
           'config.model.decoder': config.model.get('decoder'),
           'config.self_distill (local_weight, masked_weight)': (
               config.self_distill.get('local_weight') or
               config.self_distill.get('masked_weight')) if 'self_distill' in config else 0}
  bad = [k for k, v in clash.items() if v]
  if bad:
    raise ValueError(f'config.naflex.budget={length} does not combine with {bad}: NaFlex '
                     'sets the token count itself, and those need fixed-size images.')
