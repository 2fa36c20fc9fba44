"""SigLIP 2's self-distillation terms of the train step: SILC local-to-global and TIPS
masked prediction against the EMA teacher (mmcl/train/ema.py).

The teacher (EMA parameters, no gradient) sees the global view `batch[global_key]`; the
student sees the local crops `batch[local_key]` [B, V, h, w, 3] (SILC) and the same global
view with a fraction of its patches replaced by the learned mask token (TIPS). The
contrastive loss keeps the original `image`: SigLIP 2 applies "the additional losses on
additional augmented views" so that augmentation does not hurt image-text alignment (after
SILC). Losses: mmcl/losses/self_distill.py; heads: mmcl/models/distill_heads.py.

When: from `start_step` = round(start_fraction * total_steps) on (SigLIP 2: the last 20%
of training). The training loop runs two programs, one without the terms before the switch
and one with them from it on (`fixed(phase)`; the host picks by step, as for the model
variants of mmcl/train/variants.py): on XLA:CPU the same terms inside a `lax.cond` on the
traced step ran 3.4x slower than straight-line (docs/siglip2.md), and a cond's program
holds the terms' buffers for the whole run. `phase=None` is that single traced-switch
program (one compile), kept as the reference the two are tested against. The heads, mask
token and centres stay as initialised until the switch (their updates are held back, so
weight decay does not shrink them meanwhile), the teacher is a copy of the student up to it
(ema.start_step defaults to start_step): SigLIP 2 starts the teacher from the student and
the heads fresh at that point.
"""
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from mmcl.losses import self_distill as sd_loss
from mmcl.models import distill_heads, vit
from mmcl.train import grad_cache

KEY = 'self_distill'  # params[KEY]: heads and mask token; state[KEY]: the centres.


@dataclasses.dataclass(frozen=True)
class SelfDistill:
  model: Any
  heads: distill_heads.SelfDistillHeads
  patch_size: int
  start_step: int
  local_weight: float
  masked_weight: float
  mask_ratio: float = 0.5
  student_temp: float = 0.1
  teacher_temp: float = 0.04
  center_momentum: float = 0.9
  global_key: str = 'global_view'
  local_key: str = 'local_crops'
  accum_steps: int = 1  # Micro-batches of the terms (default: config.accum_steps).
  phase: str | None = None  # 'off' / 'on': the terms never / always; None: a lax.cond.

  def fixed(self, phase: str) -> 'SelfDistill':
    if phase not in ('off', 'on'):
      raise ValueError(f"SelfDistill phase {phase!r}; valid: 'off', 'on'.")
    return dataclasses.replace(self, phase=phase)

  def phase_of(self, step: int) -> str:
    """The phase of the step that starts from state['step'] == `step`."""
    return 'on' if step >= self.start_step else 'off'

  def batch_keys(self) -> tuple[str, ...]:
    return (self.global_key,) + ((self.local_key,) if self.local_weight else ())

  def metric_names(self) -> tuple[str, ...]:
    return (('local_loss',) if self.local_weight else ()) + (
        ('masked_loss',) if self.masked_weight else ()) + ('loss',)

  def init_params(self, rng):
    x_1xD = jnp.zeros((1, self.heads.width), jnp.float32)
    return self.heads.init(rng, x_1xD, x_1xD)['params']

  def init_state(self) -> dict:
    zeros_K = jnp.zeros((self.heads.prototypes,), jnp.float32)
    return {'center': zeros_K, 'patch_center': zeros_K}

  def active(self, step):
    if self.phase is not None:
      return self.phase == 'on'
    return step >= self.start_step

  def value_and_grad(self, state, batch, rng, batch_sharding=None):
    """(value, metrics, new centres, gradient wrt state['params']): a gradient of its own,
    added to the contrastive one by the train step (the terms share no activations).
    Zeros and the old centres before start_step."""
    def on():
      return self._value_and_grad(state, batch, rng, batch_sharding)

    def off():
      zero = jnp.zeros((), jnp.float32)
      return (zero, {name: zero for name in self.metric_names()}, state[KEY],
              jax.tree.map(jnp.zeros_like, state['params']))

    if self.phase is not None:
      return on() if self.phase == 'on' else off()
    return jax.lax.cond(self.active(state['step']), on, off)

  def hold_heads(self, new_params, old_params, step):
    """params[KEY] only moves once the terms are on."""
    held = jax.tree.map(lambda n, o: jnp.where(self.active(step), n, o),
                        new_params[KEY], old_params[KEY])
    return {**new_params, KEY: held}

  def _value_and_grad(self, state, batch, rng, batch_sharding):
    """The terms' value and gradient, over `accum_steps` micro-batches when > 1. Each term
    is a mean over equal-sized groups of examples and each centre moves by the batch mean
    of the teacher's logits, so the means over micro-batches are the full batch's; only
    the activations shrink (the patch head's [B/k, N, prototypes] logits dominate)."""
    views = {key: batch[key] for key in self.batch_keys()}
    rng_mask, rng = jax.random.split(rng)
    if self.masked_weight:  # Drawn for the whole batch: the same with any micro-batching.
      view = views[self.global_key]
      views['token_mask'] = sd_loss.random_token_mask(rng_mask, view.shape[0],
                                                      self._num_patches(view), self.mask_ratio)
    teacher = jax.lax.stop_gradient(state['ema'])
    grad_fn = jax.value_and_grad(self._terms, has_aux=True)

    def one(micro, micro_rng):
      (value, (metrics, means)), grads = grad_fn(state['params'], teacher, state[KEY], micro,
                                                 micro_rng)
      return value, metrics, means, grads

    k = self.accum_steps
    if k == 1:
      value, metrics, means, grads = one(views, rng)
    else:
      if batch_sharding is None:
        raise ValueError(f'SelfDistill.accum_steps={k} needs the batch sharding.')
      micro = jax.tree.map(lambda x: grad_cache.split(x, k, batch_sharding), views)
      micro_rngs = jax.random.split(rng, k)
      shapes = jax.eval_shape(one, jax.tree.map(lambda x: x[0], micro), micro_rngs[0])
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      mean_of = lambda total, x: jax.tree.map(lambda t, v: t + v / k, total, x)
      (value, metrics, means, grads), _ = jax.lax.scan(
          lambda total, inputs: (mean_of(total, one(*inputs)), None), zeros,
          (micro, micro_rngs))
    centres = {name: sd_loss.update_center(c, means[name], self.center_momentum)
               if name in means else c for name, c in state[KEY].items()}
    return value, metrics, centres, grads

  def _num_patches(self, images_BxHxWx3) -> int:
    _, h, w, _ = images_BxHxWx3.shape
    return (h // self.patch_size) * (w // self.patch_size)

  def _image(self, params, images, train, rng=None, **masking):
    _, _, out = self.model.apply({'params': _model_params(params)}, images, None, train=train,
                                 rngs={'dropout': rng} if train else {}, **masking)
    return out['img/pre_logits'], out['img/encoded']

  def _project(self, head_params, x, method):
    return self.heads.apply({'params': head_params}, x, method=method)

  def _terms(self, params, teacher, sd_state, views, rng):
    """(weighted loss, (metrics, the teacher's mean logits per centre)) of `views`."""
    view_BxHxWx3 = views[self.global_key]
    b, n = view_BxHxWx3.shape[0], self._num_patches(view_BxHxWx3)
    t_pooled_BxD, t_encoded = self._image(teacher, view_BxHxWx3, train=False)
    t_tokens_BxNxD = t_encoded[:, t_encoded.shape[1] - n:]  # Patches after any class token.
    heads, t_heads = params[KEY], teacher[KEY]
    t_global_BxK = self._project(t_heads, t_pooled_BxD, 'project_global')
    means = {'center': jnp.mean(t_global_BxK.astype(jnp.float32), axis=0)}
    temps = dict(student_temp=self.student_temp, teacher_temp=self.teacher_temp)
    total, metrics = jnp.zeros((), jnp.float32), {}
    rng_local, rng_masked = jax.random.split(rng)
    if self.local_weight:
      crops_BxVxhxwx3 = views[self.local_key]
      v = crops_BxVxhxwx3.shape[1]
      s_pooled, _ = self._image(params, jnp.reshape(crops_BxVxhxwx3, (b * v,) +
                                                    crops_BxVxhxwx3.shape[2:]),
                                train=True, rng=rng_local)
      s_local_BxVxK = jnp.reshape(self._project(heads, s_pooled, 'project_global'), (b, v, -1))
      local = sd_loss.local_to_global(s_local_BxVxK, t_global_BxK, sd_state['center'], **temps)
      total, metrics['local_loss'] = total + self.local_weight * local, local
    if self.masked_weight:
      mask_BxN = views['token_mask']
      _, s_encoded = self._image(params, view_BxHxWx3, train=True, rng=rng_masked,
                                 token_mask=mask_BxN, mask_token=heads['mask_token'])
      s_patch_BxNxK = self._project(heads, s_encoded[:, s_encoded.shape[1] - n:],
                                    'project_patches')
      t_patch_BxNxK = self._project(t_heads, t_tokens_BxNxD, 'project_patches')
      masked = sd_loss.masked_prediction(s_patch_BxNxK, t_patch_BxNxK, mask_BxN,
                                         sd_state['patch_center'], **temps)
      means['patch_center'] = jnp.mean(t_patch_BxNxK.astype(jnp.float32), axis=(0, 1))
      total, metrics['masked_loss'] = total + self.masked_weight * masked, masked
    metrics['loss'] = total
    return total, (metrics, jax.lax.stop_gradient(means))


def view_shapes(config, distill: SelfDistill) -> dict[str, tuple[int, ...]]:
  """Per-example shapes of the extra views the input pipeline must yield."""
  cfg = config.self_distill
  size = cfg.get('global_size') or config.image_size
  shapes = {distill.global_key: (size, size, 3)}
  if distill.local_weight:
    local = cfg.get('local_size') or size
    shapes[distill.local_key] = (int(cfg.get('num_local', 8)), local, local, 3)
  return shapes


def _model_params(params):
  return {k: v for k, v in params.items() if k != KEY}


def from_config(config, mesh=None) -> SelfDistill | None:
  """config.self_distill -> SelfDistill (its model over `mesh`), or None when both weights
  are 0 (the default)."""
  cfg = config.get('self_distill') or {}
  local_w, masked_w = float(cfg.get('local_weight', 0.0)), float(cfg.get('masked_weight', 0.0))
  if not (local_w or masked_w):
    return None
  if local_w < 0 or masked_w < 0:
    raise ValueError(f'config.self_distill weights must be >= 0, got local_weight={local_w}, '
                     f'masked_weight={masked_w}.')
  from mmcl import models  # pylint: disable=g-import-not-at-top
  if config.model.name != 'two_towers':
    raise ValueError(f'config.self_distill needs a two-tower model (a ViT image tower); '
                     f'config.model.name={config.model.name!r}.')
  frac = float(cfg.get('start_fraction', 0.8))
  if not 0 <= frac < 1:
    raise ValueError(f'config.self_distill.start_fraction={frac} must be in [0, 1) (SigLIP 2: '
                     '0.8, the last 20% of training).')
  for name in ('student_temp', 'teacher_temp'):
    if not cfg.get(name, 1.0) > 0:
      raise ValueError(f'config.self_distill.{name}={cfg.get(name)} must be > 0.')
  image = dict(config.model.get('image') or {})
  hp = vit.resolve_hparams(image.get('variant'), image.get('width'), image.get('depth'),
                           image.get('mlp_dim'), image.get('num_heads'), image.get('patch_size'))
  heads = distill_heads.SelfDistillHeads(
      width=hp['width'], hidden=int(cfg.get('hidden', 2048)),
      bottleneck=int(cfg.get('bottleneck', 256)), prototypes=int(cfg.get('prototypes', 65_536)))
  return SelfDistill(
      model=models.get_model(config.model, mesh), heads=heads, patch_size=hp['patch_size'],
      start_step=int(round(frac * config.total_steps)), local_weight=local_w,
      masked_weight=masked_w, mask_ratio=float(cfg.get('mask_ratio', 0.5)),
      student_temp=float(cfg.get('student_temp', 0.1)),
      teacher_temp=float(cfg.get('teacher_temp', 0.04)),
      center_momentum=float(cfg.get('center_momentum', 0.9)),
      global_key=cfg.get('global_key', 'global_view'),
      local_key=cfg.get('local_key', 'local_crops'),
      accum_steps=accum_steps(config))


def accum_steps(config) -> int:
  """config.self_distill.accum_steps, by default config.accum_steps (GradCache's)."""
  k = (config.get('self_distill') or {}).get('accum_steps')
  return int(config.get('accum_steps', 1) if k is None else k)
