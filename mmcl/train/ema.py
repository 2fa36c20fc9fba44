"""An exponential moving average (EMA) of the parameters: the teacher of self-distillation
and, with `config.ema.eval`, the weights the evaluators see.

config.ema.decay = None (default) keeps the train state exactly as before (no 'ema').
Before `start_step` the EMA tracks the parameters exactly; from then on
ema <- decay * ema + (1 - decay) * params after every applied update. So the teacher
starts as a copy of the student at start_step, as SigLIP 2 does when its self-distillation
begins ("initializing the teacher with the student parameters", at 80% of training). SILC
keeps the momentum fixed rather than DINO's cosine schedule to 1 (a teacher frozen late
would stop following the image-text loss): so does this, one decay for the whole run.
"""
import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Ema:
  decay: float
  start_step: int = 0

  def __post_init__(self):
    if not 0 <= self.decay < 1:
      raise ValueError(f'config.ema.decay={self.decay} must be in [0, 1) (e.g. 0.996), '
                       'or None for no EMA.')
    if self.start_step < 0:
      raise ValueError(f'config.ema.start_step={self.start_step} must be >= 0.')

  def update(self, ema, params, new_step):
    """The EMA after the update that made `params` (the state's step is now new_step)."""
    decay = jnp.where(new_step <= self.start_step, 0.0, self.decay)
    return jax.tree.map(lambda e, p: (decay * e + (1 - decay) * p).astype(e.dtype), ema, params)


def from_config(config, default_start: int = 0) -> Ema | None:
  """config.ema -> Ema or None (off). start_step None: `default_start` (the
  self-distillation's first step when it is on, else 0)."""
  cfg = config.get('ema') or {}
  if cfg.get('decay') is None:
    return None
  start = cfg.get('start_step')
  return Ema(float(cfg['decay']), default_start if start is None else int(start))


def eval_key(config) -> str:
  """The state entry evaluators read: 'ema' with config.ema.eval (SigLIP 2 / SILC
  evaluate the teacher), else 'params'."""
  cfg = config.get('ema') or {}
  if not cfg.get('eval'):
    return 'params'
  if cfg.get('decay') is None:
    raise ValueError('config.ema.eval=True needs an EMA: set config.ema.decay (e.g. 0.996).')
  return 'ema'
