"""The optax optimizer and learning-rate schedule from `config.optim` / `config.schedule`.

AdamW with warmup + cosine decay, global-norm gradient clipping, weight decay only on
matrices (not on biases, norm scales or the temperature/bias scalars), and an optional
regex of frozen parameters (`config.optim.freeze = 'img/.*'` is LiT: a locked image tower).
"""
import re

import jax
import ml_collections
import optax

from mmcl.tree import path_str

SCHEDULES = ('cosine', 'linear', 'constant')
TEMPERATURES = ('learned', 'fixed', 'cosine', 'linear')
MU_DTYPES = (None, 'float32', 'bfloat16')


def make_schedule(config: ml_collections.ConfigDict) -> optax.Schedule:
  sched = config.schedule
  # Warmup is capped at the run length, so `--config.total_steps=30` works on any recipe.
  total, warmup = config.total_steps, min(sched.warmup_steps, config.total_steps)
  if sched.name not in SCHEDULES:
    raise ValueError(f'Unknown schedule {sched.name!r}; valid: {SCHEDULES}')
  if warmup < 0:
    raise ValueError(f'config.schedule.warmup_steps={warmup} must be >= 0.')
  peak, end = config.lr, config.lr * sched.end_factor
  warm = optax.linear_schedule(0.0, peak, max(warmup, 1))
  decay_steps = max(total - warmup, 1)
  decay = {
      'cosine': optax.cosine_decay_schedule(peak, decay_steps, alpha=sched.end_factor),
      'linear': optax.linear_schedule(peak, end, decay_steps),
      'constant': optax.constant_schedule(peak),
  }[sched.name]
  return optax.join_schedules([warm, decay], [warmup])


def _decay_mask(params):
  return jax.tree.map(lambda p: p.ndim > 1, params)


def _freeze_labels(params, pattern: str):
  def label(path, _):
    return 'frozen' if re.fullmatch(pattern, path_str(path)) else 'trained'
  return jax.tree_util.tree_map_with_path(label, params)


def trained_mask(config: ml_collections.ConfigDict, params_shape):
  """A tree of bools, False for the parameters `config.optim.freeze` freezes (or None)."""
  if not config.optim.get('freeze'):
    return None
  labels = _freeze_labels(params_shape, config.optim.freeze)
  return jax.tree.map(lambda label: label == 'trained', labels)


def make_optimizer(config: ml_collections.ConfigDict, params_shape) -> optax.GradientTransformation:
  """`params_shape` (arrays or ShapeDtypeStructs) fixes the decay/freeze masks."""
  opt = config.optim
  if opt.name != 'adamw':
    raise ValueError(f"Unknown optimizer {opt.name!r}; valid: ('adamw',)")
  schedule = make_schedule(config)
  chain = []
  if opt.grad_clip:
    chain.append(optax.clip_by_global_norm(opt.grad_clip))
  mu_dtype = opt.get('mu_dtype') or None
  if mu_dtype not in MU_DTYPES:
    raise ValueError(f'Unknown config.optim.mu_dtype {mu_dtype!r}; valid: {MU_DTYPES}')
  # Adam's first moment in bf16 halves its bytes (the second stays float32: its square
  # roots of tiny values need the range).
  chain.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps, mu_dtype=mu_dtype,
                           weight_decay=opt.weight_decay, mask=_decay_mask))
  tx = optax.chain(*chain)
  if opt.get('freeze'):
    labels = _freeze_labels(params_shape, opt.freeze)
    if 'frozen' not in jax.tree.leaves(labels):
      raise ValueError(f'config.optim.freeze={opt.freeze!r} matches no parameter.')
    if 'trained' not in jax.tree.leaves(labels):
      raise ValueError(f'config.optim.freeze={opt.freeze!r} freezes every parameter: '
                       'nothing would train. Freeze one tower, e.g. "img/.*" (LiT).')
    tx = optax.multi_transform({'trained': tx, 'frozen': optax.set_to_zero()}, labels)
  return tx


def make_temperature(config: ml_collections.ConfigDict):
  """`config.temperature` -> None (the model's learned scale) or fn(step, learned) -> scale.

  {'type': 'learned'} (default); {'type': 'fixed', 'value': 14.3}; {'type': 'cosine' or
  'linear', 'init': 10.0, 'end': 100.0}: from init to end over the run. A fixed or scheduled
  scale leaves the model's `t` parameter unused (zero gradient).
  """
  temp = config.get('temperature') or {'type': 'learned'}
  kind = temp.get('type', 'learned')
  if kind not in TEMPERATURES:
    raise ValueError(f'Unknown config.temperature.type {kind!r}; valid: {TEMPERATURES}')
  if kind == 'learned':
    return None
  need = ('value',) if kind == 'fixed' else ('init', 'end')
  missing = [k for k in need if temp.get(k) is None]
  if missing:
    raise ValueError(f'config.temperature.type={kind!r} needs {missing}.')
  if any(temp[k] <= 0 for k in need):
    raise ValueError(f'config.temperature {dict(temp)} must be positive.')
  if kind == 'fixed':
    schedule = optax.constant_schedule(temp['value'])
  elif kind == 'cosine':
    schedule = optax.cosine_decay_schedule(temp['init'], config.total_steps,
                                           alpha=temp['end'] / temp['init'])
  else:
    schedule = optax.linear_schedule(temp['init'], temp['end'], config.total_steps)
  return lambda step, learned: jax.numpy.asarray(schedule(step), learned.dtype)
