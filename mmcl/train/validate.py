"""Config checks that run before anything compiles: each error names the bad value and
the valid choices."""
import math
import re

import jax
import ml_collections

from mmcl import evaluate, fs, losses, models
from mmcl.data import input_pipeline, preprocess, sources
from mmcl.parallel import mesh as mesh_lib
from mmcl.parallel import partition
from mmcl.train import distill as distill_lib
from mmcl.train import ema as ema_lib
from mmcl.train import naflex_input
from mmcl.train import optim
from mmcl.train import variants


def validate(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """Checks `config` and returns the mesh it describes."""
  mesh = mesh_lib.create_mesh(config.mesh, devices)
  shards = mesh_lib.num_batch_shards(mesh)
  if not config.batch_size > 0:  # 0 would pass every divisibility check below.
    raise ValueError(f'config.batch_size={config.batch_size} must be positive (the global '
                     f'batch, a multiple of the {shards} batch shards).')
  if not config.lr >= 0 or not math.isfinite(config.lr):
    raise ValueError(f'config.lr={config.lr} must be a finite number >= 0 (the peak of '
                     f'config.schedule.name={config.schedule.name!r}).')
  if config.batch_size % shards:
    raise ValueError(
        f'config.batch_size={config.batch_size} does not divide over the {shards} batch shards '
        f'of config.mesh={list(map(tuple, config.mesh))}; use a multiple of {shards}.')
  for name, accum in (('accum_steps', config.get('accum_steps', 1)),
                      ('self_distill.accum_steps', distill_lib.accum_steps(config))):
    if accum < 1 or config.batch_size % (accum * shards):
      default = ' (default: config.accum_steps)' if name != 'accum_steps' else ''
      raise ValueError(
          f'config.{name}={accum}{default} must be >= 1 and split config.batch_size='
          f'{config.batch_size} into micro-batches that divide over the {shards} batch shards '
          f'(batch_size must be a multiple of accum_steps x {shards}: accum_steps a divisor '
          f'of {config.batch_size // shards}).')
  optim.make_temperature(config)  # Unknown or incomplete temperature settings.
  if config.batch_size % jax.process_count():
    raise ValueError(f'config.batch_size={config.batch_size} does not divide over '
                     f'{jax.process_count()} processes.')
  if not 0 < config.total_steps:
    raise ValueError(f'config.total_steps={config.total_steps} must be positive.')
  models.get_model(config.model)  # Unknown model names, variants and fields.
  variants.check(config)  # unmasked_from_step, flexi_patch_sizes.
  naflex_input.check(config)
  spec = losses.get_loss(config.loss.name, config.loss.impl)
  if spec.needs_bias and config.model.get('bias_init') is None:
    raise ValueError(f'config.loss.name={config.loss.name!r} needs a learned bias: set '
                     'config.model.bias_init (SigLIP: -10.0).')
  for name in [n for n, _ in config.input.mixture] or [config.input.name]:
    sources.check_name(name)  # A scheme typo ('cvs:') would reach TFDS's name parser.
  try:
    sources.options(config.input.get('csv'))  # A bad separator or an unknown option.
  except ValueError as e:
    raise ValueError(f'config.input.csv: {e}') from e
  preprocess.get_preprocess_fn(input_pipeline.format_pp(config.input.pp, config))
  for cfg in config.evals.values():
    if 'pp_img' in cfg:
      preprocess.get_preprocess_fn(input_pipeline.format_pp(cfg.pp_img, config))
  evaluate.check_types(config.evals)
  init = config.get('model_init')
  if init and not fs.exists(init):  # Local or remote (gs://...).
    raise ValueError(f'config.model_init={init!r} does not exist: give a .npz from '
                     'tools/convert.py or a checkpoint step directory <workdir>/ckpt/<step>.')
  for pattern in config.get('model_init_dont_load', ()):
    re.compile(pattern)  # re.error names the bad pattern.
  partition.validate_rules(config.sharding_rules)
  _check_self_distill(config)
  return mesh


def _check_self_distill(config):
  """EMA and self-distillation settings (docs/siglip2.md)."""
  distill = distill_lib.from_config(config)
  ema = ema_lib.from_config(config, distill.start_step if distill else 0)
  ema_lib.eval_key(config)
  if distill is not None and ema is None:
    raise ValueError('config.self_distill needs an EMA teacher: set config.ema.decay '
                     '(e.g. 0.996, DINO; SILC keeps it fixed).')


def check_batch(batch: dict, expected: dict, loss_extras=None):
  """The first batch must match the shapes the train step was built for."""
  for name, key in (loss_extras or {}).items():
    if key not in batch:
      raise ValueError(f'config.loss.extras.{name}={key!r}, but the input pipeline yields no '
                       f'{key!r} (keys: {sorted(batch)}); keep it in config.input.pp.')
  for key, want in expected.items():
    if key not in batch:
      raise ValueError(f'The input pipeline yields no {key!r} (keys: {sorted(batch)}); '
                       'check config.input.pp.')
    got = batch[key]
    if tuple(got.shape) != tuple(want.shape) or got.dtype != want.dtype:
      hint = {'image': 'config.naflex.budget' if 'patch_mask' in expected else
                       'config.image_size', 'text': 'config.text_len'}.get(
          key, 'config.model.decoder.max_len' if key.startswith('dec_') else
          'config.naflex.budget' if key.startswith('patch_') else
          'config.self_distill (global_size, local_size, num_local)')
      raise ValueError(f'Batch {key!r} has shape {tuple(got.shape)} {got.dtype}, expected '
                       f'{tuple(want.shape)} {want.dtype}: check {hint} and config.input.pp.')
