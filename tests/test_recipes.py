"""The paper-scale recipes: their published settings, and each `:tiny` variant trains.

The full-size configs are checked for what the papers state (and compiled for their TPU
slices by tests/test_tpu_compile.py's tool and BENCHMARKS.md section 5); the tiny ones
train a few steps on the synthetic shapes with the recipe's loss, pooling and optimizer.
"""
import importlib
import pathlib

import numpy as np
import pytest

import configs

from mmcl.train import loop
from mmcl.train import metrics as metrics_lib

RECIPES = ('clip_b16', 'clip_l14', 'siglip_b16', 'siglip_so400m14', 'lit_b16')


def _config(name, arg=''):
  return importlib.import_module(f'configs.{name}').get_config(arg)


def test_published_settings():
  for name in RECIPES:
    c = _config(name)
    assert c.batch_size == 32_768 and c.image_size == 224, name
    assert c.model.dtype == 'bfloat16', name
  clip = _config('clip_b16')
  assert (clip.lr, clip.optim.b2, clip.optim.weight_decay, clip.text_len) == (5e-4, 0.98, 0.2, 77)
  assert clip.model.max_temperature == 100.0 and abs(clip.model.temperature_init - 1 / 0.07) < 1e-9
  assert _config('clip_l14').lr == 4e-4
  siglip = _config('siglip_b16')
  assert (siglip.loss.name, siglip.model.bias_init, siglip.model.temperature_init) == (
      'sigmoid', -10.0, 10.0)
  assert (siglip.lr, siglip.optim.b2, siglip.optim.weight_decay, siglip.text_len) == (
      1e-3, 0.95, 1e-4, 16)
  assert _config('siglip_so400m14').model.image.variant == 'So400m/14'
  assert _config('lit_b16').optim.freeze == 'img/.*'
  with pytest.raises(ValueError, match='tiny'):
    _config('clip_b16', 'huge')


def _recipes_with_options():
  for path in sorted(pathlib.Path(configs.__file__).parent.glob('*.py')):
    text = path.read_text()
    if 'def get_config' in text and 'OPTIONS' in text:
      yield path.stem


@pytest.mark.parametrize('name', list(_recipes_with_options()))
def test_unknown_options_are_refused_naming_the_valid_ones(name):
  module = importlib.import_module(f'configs.{name}')
  with pytest.raises(ValueError, match=r"\['huge'\].*valid: .*'tiny'"):
    module.get_config('tiny,huge')
  assert module.get_config('tiny').total_steps > 0


@pytest.mark.slow
@pytest.mark.parametrize('name', RECIPES + ('siglip2_b16:distill',))
def test_tiny_recipe_trains(shapes_data_dir, tmp_path, name):
  name, _, options = name.partition(':')
  c = _config(name, ','.join(['tiny'] + [options] * bool(options)))
  c.data_dir = shapes_data_dir
  c.progress_bar = False
  c.total_steps, c.log_every, c.ckpt_every = 12, 1, 100
  final = loop.run(c, str(tmp_path))
  losses = [r['train/loss'] for r in metrics_lib.read_metrics(str(tmp_path))
            if 'train/loss' in r]
  assert len(losses) == 12 and np.all(np.isfinite(losses))
  assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
  assert 0.0 <= final['zeroshot/mmcl_shapes/shape/top1'] <= 1.0
  if c.self_distill.local_weight:  # On for the last 20% (steps 11, 12), micro-batched.
    sd = [r['train/self_distill/loss'] for r in metrics_lib.read_metrics(str(tmp_path))
          if 'train/self_distill/loss' in r]
    assert sd[-2] > 0 and sd[-1] > 0 and sd[-3] == 0, sd


def test_lit_step_drops_the_frozen_towers_backward_pass():
  c = _config('lit_b16', 'tiny')
  c.evals = {}
  flops = {}
  for freeze in ('img/.*', ''):
    c.optim.freeze = freeze
    s = loop.setup(c)
    compiled = s.compile()
    flops[freeze] = compiled.cost_analysis()['flops']
  # The image tower is ~half this model's compute; its backward (2/3 of it) is gone.
  assert flops['img/.*'] < 0.6 * flops[''], flops
