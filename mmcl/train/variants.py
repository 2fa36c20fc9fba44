"""Per-step model variants: several compiled train steps over one set of parameters.

Two settings change the image token count between steps, so they cannot be a traced value
(the shapes would no longer be static):
  config.unmasked_from_step = S > 0: FLIP's unmasked phase: from step S on, no patch dropout.
  config.flexi_patch_sizes = (p1, p2, ...): FlexiViT: each step patchifies at a size drawn
    uniformly from these (FlexiViT samples per step from a set of sizes).
Each distinct variant is its own model (same parameter tree: patch dropout has no parameters,
and a FlexiViT tower stores its kernel and position embedding at one size) and its own jitted
step, compiled when a step first needs it; the host picks the variant per step. The draw is
a function of (seed, step) only, so every process agrees and a resumed run repeats it.

SigLIP 2's self-distillation (mmcl/train/distill.py) adds a phase to the key: the program
without its terms before `start_step`, the one with them from it on.

Why not one program: a ratio traced into the step would need a mask over all N tokens instead
of a gather to K of them, which keeps the full encoder cost: the very thing FLIP saves.
"""
from collections.abc import Callable
import copy

import numpy as np

from mmcl import models


def image_fields(model_cfg: dict, **fields) -> dict:
  """`model_cfg` (plain dict) with image-tower `fields` set where the model keeps them:
  TwoTowers under 'image', LIMoE (one shared tower, image options at the top level)."""
  cfg = copy.deepcopy(model_cfg)
  if cfg.get('name') == 'limoe':
    unknown = sorted(set(fields) - {'patch_dropout'})
    if unknown:
      raise ValueError(f'LIMoE has no image option(s) {unknown}; it takes patch_dropout only.')
    cfg.update(fields)
  else:
    cfg['image'] = {**(cfg.get('image') or {}), **fields}
  return cfg


def check(config):
  """Config errors of the variant settings, before anything compiles."""
  start = config.get('unmasked_from_step', 0) or 0
  if start < 0:
    raise ValueError(f'config.unmasked_from_step={start} must be >= 0 (0: never unmasked).')
  sizes = tuple(config.get('flexi_patch_sizes', ()) or ())
  if any(int(p) <= 0 for p in sizes):
    raise ValueError(f'config.flexi_patch_sizes={sizes} must be positive patch sizes.')
  if sizes and config.model.name == 'limoe':
    raise ValueError('config.flexi_patch_sizes is for two_towers models (ViT image tower).')
  if sizes and not (config.model.get('image') or {}).get('posemb_grid'):
    raise ValueError('config.flexi_patch_sizes needs config.model.image.posemb_grid (the grid '
                     'the position embedding is stored on and resampled from), e.g. '
                     'image_size // patch_size.')
  bad = [p for p in sizes if config.image_size % int(p)]
  if bad:
    raise ValueError(f'config.flexi_patch_sizes {bad} do not divide config.image_size='
                     f'{config.image_size}.')


def variant_key(config, step: int) -> tuple:
  """The image-tower overrides of `step` (1-based, as the loop counts), as sorted items."""
  fields = {}
  start = config.get('unmasked_from_step', 0) or 0
  if start and step >= start:
    fields['patch_dropout'] = 0.0
  sizes = tuple(int(p) for p in (config.get('flexi_patch_sizes', ()) or ()))
  if sizes:
    fields['apply_patch_size'] = sizes[np.random.default_rng([config.seed, step]).integers(
        len(sizes))]
  return tuple(sorted(fields.items()))


def has_variants(config) -> bool:
  return bool(config.get('unmasked_from_step', 0) or config.get('flexi_patch_sizes', ()))


PHASE = 'self_distill'  # The key item of the self-distillation phase.


class StepVariants:
  """step -> the train step of its variant; `build(model, distill)` jits one per variant.

  With `lower_args` (the sharded abstract state and batch shapes) each is compiled ahead of
  its first step, so the loop reads its cost analysis and it never compiles twice.
  """

  def __init__(self, config, build: Callable, mesh=None, distill=None, lower_args=None):
    self._config = config
    self._mesh = mesh
    self._model_cfg = config.model.to_dict()
    self.build = build
    self._distill = distill
    self._lower_args = lower_args
    self._steps = {}

  def model(self, key: tuple):
    fields = {k: v for k, v in key if k != PHASE}
    return models.get_model(image_fields(self._model_cfg, **fields), self._mesh)

  def key(self, step: int) -> tuple:
    """`step`'s variant (1-based, as the loop counts): image-tower overrides, then the
    self-distillation phase of its state step (step - 1)."""
    key = variant_key(self._config, step)
    if self._distill is not None:
      key += ((PHASE, self._distill.phase_of(step - 1)),)
    return key

  def __call__(self, step: int):
    key = self.key(step)
    if key not in self._steps:
      distill = self._distill and self._distill.fixed(dict(key)[PHASE])
      fn = self.build(self.model(key), distill)
      self._steps[key] = fn.lower(*self._lower_args).compile() if self._lower_args else fn
    return self._steps[key]
