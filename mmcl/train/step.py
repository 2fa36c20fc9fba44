"""One sharded training update: a pure function of (state, batch), jitted once.

state = {'step': int32[], 'params': ..., 'opt': optax state, 'skipped': int32[2]}, plus
'ema' (the parameters' EMA, mmcl/train/ema.py) with config.ema.decay set and
'self_distill' (centres) with SigLIP 2's self-distillation (mmcl/train/distill.py).
Parameters and optimizer state stay sharded by the partition rules; the batch is sharded
over the batch axes. An update whose loss or gradient is not finite is skipped: params and
optimizer state stay as they were, and `skipped` counts (in a row, in total) such steps.
"""
from collections.abc import Callable
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmcl.models import naflex
from mmcl.parallel import partition
from mmcl.train import distill as distill_lib
from mmcl.train import grad_cache


def init_params(model: nn.Module, rng, batch_shapes, distill=None) -> dict:
  """The model's parameters, and the self-distillation heads under params['self_distill']."""
  zeros = {k: jnp.zeros(v.shape, v.dtype) for k, v in batch_shapes.items()}
  params = model.init({'params': rng}, naflex.patch_dict(zeros), zeros['text'],
                      train=False)['params']
  if distill is not None:
    params = {**params, distill_lib.KEY: distill.init_params(jax.random.fold_in(rng, 1))}
  return params


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng, batch_shapes, *,
               ema=None, distill=None) -> dict:
  """A fresh train state. Meant to run under `jax.jit(out_shardings=...)`."""
  return state_of(init_params(model, rng, batch_shapes, distill), tx, ema=ema, distill=distill)


def state_of(params, tx: optax.GradientTransformation, *, ema=None, distill=None) -> dict:
  """The fresh train state around `params`: step 0, the optimizer's state, [EMA, ...]."""
  state = {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': tx.init(params),
           'skipped': jnp.zeros((2,), jnp.int32)}
  if ema is not None:
    state['ema'] = jax.tree.map(jnp.copy, params)
  if distill is not None:
    state[distill_lib.KEY] = distill.init_state()
  return state


def state_shardings(params_shape, tx, mesh, rules, *, ema=None, distill=None):
  """(abstract state, its shardings) from the abstract parameters, without allocating
  anything (or running the model's init again): eval_shape + rules."""
  abstract = jax.eval_shape(functools.partial(state_of, tx=tx, ema=ema, distill=distill),
                            params_shape)
  shardings = partition.tree_shardings(abstract, mesh, rules)
  if ema is not None:  # The EMA is laid out exactly like the parameters it follows.
    shardings['ema'] = shardings['params']
  return abstract, shardings


def train_step(state: dict, batch: dict, *, model: nn.Module, tx, loss_fn: Callable,
               schedule: Callable, seed: int, accum_steps: int = 1, batch_sharding=None,
               temperature: Callable | None = None, loss_extras=None, trained=None, ema=None,
               distill=None, model_inputs=(), contrastive_weight: float = 1.0):
  """Returns (new state, metrics); metrics are replicated scalars.

  accum_steps > 1 computes the same gradient with GradCache (see grad_cache.py).
  temperature(step, learned_scale) -> the scale the loss uses (default: the learned one).
  loss_extras maps a loss's extra input name to the batch key that holds it.
  trained: a tree of bools (False: frozen, e.g. LiT's image tower); frozen gradients are
  replaced by zeros, so the compiler drops the frozen tower's backward pass altogether.
  ema: an ema.Ema (state['ema'] follows the parameters); distill: a distill.SelfDistill
  (SigLIP 2's self-distillation terms, with their own gradient, added to the update).
  model_inputs: batch keys passed to the model by name (the captioning decoder's targets,
  'dec_tokens' and 'dec_loss_mask'); the model returns their weighted loss in its aux_loss.
  contrastive_weight scales the contrastive loss (0: a captioning-only run, e.g. CapPa).
  """
  step_rng = jax.random.fold_in(jax.random.key(seed), state['step'])
  extras = {name: batch[key] for name, key in (loss_extras or {}).items()}

  def embed(params, batch, rng):
    # The images, or under NaFlex the patch dict (mmcl/models/naflex.py).
    zimg, ztxt, out = model.apply({'params': params}, naflex.patch_dict(batch), batch['text'],
                                  train=True, rngs={'dropout': rng},
                                  **{k: batch[k] for k in model_inputs})
    heads = {'t': out['t'] if temperature is None else temperature(state['step'], out['t'])}
    if 'b' in out:
      heads['b'] = out['b']
    aux = jnp.asarray(out.get('aux_loss', 0.0), jnp.float32)  # e.g. MoE losses, weighted.
    return zimg, ztxt, heads, aux, out.get('metrics', {})

  def loss(zimg, ztxt, heads):
    value, metrics = loss_fn(zimg, ztxt, heads['t'], heads.get('b'), extras=extras)
    return contrastive_weight * value, metrics

  def total_loss(params):
    zimg, ztxt, heads, aux, model_metrics = embed(params, batch, step_rng)
    value, loss_metrics = loss(zimg, ztxt, heads)
    return value + aux, (value, loss_metrics, heads, model_metrics)

  if accum_steps == 1:
    result, grads = jax.value_and_grad(total_loss, has_aux=True)(state['params'])
  else:
    result, grads = grad_cache.value_and_grad(
        state['params'], batch, embed=embed, loss=loss, accum_steps=accum_steps,
        rng=step_rng, batch_sharding=batch_sharding)
  total, (value, loss_metrics, heads, model_metrics) = result
  extra_metrics = {}
  if distill is not None:  # SILC + TIPS terms against the EMA teacher: mmcl/train/distill.py.
    sd_value, sd_metrics, sd_state, sd_grads = distill.value_and_grad(
        state, batch, jax.random.fold_in(step_rng, 1), batch_sharding)
    total = total + sd_value
    grads = jax.tree.map(jnp.add, grads, sd_grads)
    extra_metrics.update({f'self_distill/{k}': v for k, v in sd_metrics.items()})
  if trained is not None:
    grads = jax.tree.map(lambda g, t: g if t else jnp.zeros_like(g), grads, trained)
  updates, opt = tx.update(grads, state['opt'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  if distill is not None:
    params = distill.hold_heads(params, state['params'], state['step'])
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(total) & jnp.isfinite(grad_norm)
  params, opt = jax.tree.map(lambda new, old: jnp.where(finite, new, old),
                             (params, opt), (state['params'], state['opt']))
  in_a_row, total_skips = state['skipped'][0], state['skipped'][1]
  skipped = jnp.stack([jnp.where(finite, 0, in_a_row + 1), total_skips + (~finite)])
  metrics = {
      'train/loss': value,
      'train/total_loss': total,
      'train/grad_norm': grad_norm,
      'train/skipped_in_a_row': skipped[0],
      'train/skipped_total': skipped[1],
      'train/param_norm': optax.tree.norm(params),
      'train/lr': schedule(state['step']),
      **{f'train/{k}': v for k, v in heads.items()},  # train/t, train/b.
      **{f'train/{k}': v for k, v in loss_metrics.items()},
      # Model diagnostics (e.g. MoE expert utilisation), scalars named by the model.
      **{f'train/{k}': v for k, v in model_metrics.items()},
      **{f'train/{k}': v for k, v in extra_metrics.items()},
  }
  new_state = {'step': state['step'] + 1, 'params': params, 'opt': opt, 'skipped': skipped}
  keep_if_finite = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
  if ema is not None:
    new_state['ema'] = keep_if_finite(ema.update(state['ema'], params, new_state['step']),
                                      state['ema'])
  if distill is not None:
    new_state[distill_lib.KEY] = keep_if_finite(sd_state, state[distill_lib.KEY])
  return new_state, metrics


def jit_train_step(model, tx, loss_fn, schedule, seed, state_sharding, batch_sharding, mesh,
                   **options):
  """The train step jitted once with explicit shardings; the old state is donated.

  `options`: train_step's accum_steps, temperature, loss_extras, trained, ema, distill,
  model_inputs and contrastive_weight.
  """
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn, schedule=schedule,
                         seed=seed, batch_sharding=batch_sharding, **options)
  return jax.jit(fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)
