"""One sharded training update: a pure function of (state, batch), jitted once.

state = {'step': int32[], 'params': ..., 'opt': optax state}. Parameters and optimizer
state stay sharded by the partition rules; the batch is sharded over the batch axes.
"""
from collections.abc import Callable
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from mmcl.parallel import partition


def init_state(model: nn.Module, tx: optax.GradientTransformation, rng, batch_shapes) -> dict:
  """A fresh train state. Meant to run under `jax.jit(out_shardings=...)`."""
  image = jnp.zeros(batch_shapes['image'].shape, batch_shapes['image'].dtype)
  text = jnp.zeros(batch_shapes['text'].shape, batch_shapes['text'].dtype)
  params = model.init({'params': rng}, image, text, train=False)['params']
  return {'step': jnp.zeros((), jnp.int32), 'params': params, 'opt': tx.init(params)}


def state_shardings(model, tx, rng, batch_shapes, mesh, rules):
  """(abstract state, its shardings) without allocating anything: eval_shape + rules."""
  abstract = jax.eval_shape(functools.partial(init_state, model, tx), rng, batch_shapes)
  return abstract, partition.tree_shardings(abstract, mesh, rules)


def train_step(state: dict, batch: dict, *, model: nn.Module, tx, loss_fn: Callable,
               schedule: Callable, seed: int):
  """Returns (new state, metrics); metrics are replicated scalars."""
  step_rng = jax.random.fold_in(jax.random.key(seed), state['step'])

  def total_loss(params):
    zimg, ztxt, out = model.apply({'params': params}, batch['image'], batch['text'],
                                  train=True, rngs={'dropout': step_rng})
    loss, metrics = loss_fn(zimg, ztxt, out['t'], out.get('b'))
    aux = out.get('aux_loss', 0.0)  # e.g. MoE load-balancing losses, already weighted.
    return loss + aux, (loss, metrics, out)

  grad_fn = jax.value_and_grad(total_loss, has_aux=True)
  (total, (loss, loss_metrics, out)), grads = grad_fn(state['params'])
  updates, opt = tx.update(grads, state['opt'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  metrics = {
      'train/loss': loss,
      'train/total_loss': total,
      'train/grad_norm': optax.tree.norm(grads),
      'train/param_norm': optax.tree.norm(params),
      'train/lr': schedule(state['step']),
      'train/t': out['t'],
      **{f'train/{k}': v for k, v in loss_metrics.items()},
      # Model diagnostics (e.g. MoE expert utilisation), scalars named by the model.
      **{f'train/{k}': v for k, v in out.get('metrics', {}).items()},
  }
  if 'b' in out:
    metrics['train/b'] = out['b']
  return {'step': state['step'] + 1, 'params': params, 'opt': opt}, metrics


def jit_train_step(model, tx, loss_fn, schedule, seed, state_sharding, batch_sharding, mesh):
  """The train step jitted once with explicit shardings; the old state is donated."""
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  fn = functools.partial(train_step, model=model, tx=tx, loss_fn=loss_fn,
                         schedule=schedule, seed=seed)
  return jax.jit(fn, in_shardings=(state_sharding, batch_sharding),
                 out_shardings=(state_sharding, replicated), donate_argnums=0)
