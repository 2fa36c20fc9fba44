"""GradCache accumulation, temperature modes and loss extras in the train step."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo
from mmcl import losses, models
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import grad_cache, optim, step as step_lib
from mmcl.train.loop import _batch_shapes


def _setup(mesh_config, loss='softmax', batch_size=32, **config_overrides):
  c = demo.get_config('tiny')
  c.mesh, c.batch_size, c.loss.name = mesh_config, batch_size, loss
  c.update_from_flattened_dict(config_overrides)
  mesh = mesh_lib.create_mesh(c.mesh)
  model = models.get_model(c.model)
  shapes = _batch_shapes(c, mesh)
  params = jax.jit(lambda r: step_lib.init_state(model, optax.sgd(0.1), r, shapes))(
      jax.random.key(0))['params']
  rng = np.random.default_rng(1)
  sharding = mesh_lib.batch_sharding(mesh)
  batch = {
      'image': jax.device_put(rng.normal(size=shapes['image'].shape).astype(np.float32),
                              sharding),
      'text': jax.device_put(rng.integers(2, 258, size=shapes['text'].shape, dtype=np.int32),
                             sharding)}
  return c, mesh, model, params, batch


def _embed_and_loss(model, loss_fn, batch_extras=None):
  def embed(params, batch, rng):
    zimg, ztxt, out = model.apply({'params': params}, batch['image'], batch['text'],
                                  train=True, rngs={'dropout': rng})
    return zimg, ztxt, {'t': out['t']}, jnp.float32(0.0), {}

  def loss(zimg, ztxt, heads):
    return loss_fn(zimg, ztxt, heads['t'], extras=batch_extras)
  return embed, loss


@pytest.mark.parametrize('mesh_config,accum_steps', [([('data', 8)], 4),
                                                     ([('data', 2), ('fsdp', 4)], 2)])
def test_grad_cache_equals_full_batch_gradient(mesh_config, accum_steps):
  c, mesh, model, params, batch = _setup(mesh_config)
  embed, loss = _embed_and_loss(model, losses.make_loss_fn('softmax', 'gather', mesh))
  rng = jax.random.key(3)

  def full(p):
    zimg, ztxt, heads, _, _ = embed(p, batch, rng)
    return loss(zimg, ztxt, heads)[0]

  ref_value, ref_grads = jax.jit(jax.value_and_grad(full))(params)
  (value, _), grads = jax.jit(functools.partial(
      grad_cache.value_and_grad, embed=embed, loss=loss, accum_steps=accum_steps, rng=rng,
      batch_sharding=mesh_lib.batch_sharding(mesh)))(params, batch)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    r = functools.reduce(lambda t, k: t[k.key], path, ref_grads)
    # Two float32 summation orders: their difference scales with the leaf's largest entries,
    # so a small entry of a large leaf (seen: 4e-6 of max |r|) may differ by more than a
    # per-element rtol allows; the atol grows with the leaf's scale (and stays 2e-6 for
    # gradients that are zero up to rounding, e.g. attention key biases).
    atol = max(2e-6, 1e-5 * float(np.max(np.abs(r))))
    np.testing.assert_allclose(g, r, rtol=2e-4, atol=atol, err_msg=jax.tree_util.keystr(path))

  # The test can fail: naive accumulation (mean of micro-batch losses) drops negatives.
  def naive(p):
    micro = jax.tree.map(lambda x: x.reshape(accum_steps, -1, *x.shape[1:]), batch)
    total = 0.0
    for m in range(accum_steps):
      zimg, ztxt, heads, _, _ = embed(p, jax.tree.map(lambda x: x[m], micro), rng)
      total += losses.make_loss_fn('softmax', 'global', mesh)(zimg, ztxt, heads['t'])[0]
    return total / accum_steps
  naive_grads = jax.jit(jax.grad(naive))(params)
  diff = optax.tree.norm(jax.tree.map(jnp.subtract, naive_grads, ref_grads))
  assert diff > 1e-2 * optax.tree.norm(ref_grads)


def test_accum_steps_gives_the_same_update():
  """The whole train step (AdamW, clipping, schedule) with accum_steps 4 and 1."""
  states = []
  for accum in (1, 4):
    c, mesh, model, params, batch = _setup([('data', 4), ('fsdp', 2)], accum_steps=accum)
    tx = optim.make_optimizer(c, params)
    state = {'step': jnp.int32(0), 'params': params, 'opt': tx.init(params),
             'skipped': jnp.zeros((2,), jnp.int32)}
    fn = jax.jit(functools.partial(
        step_lib.train_step, model=model, tx=tx, loss_fn=losses.make_loss_fn(
            'softmax', 'gather', mesh), schedule=optim.make_schedule(c), seed=0,
        accum_steps=accum, batch_sharding=mesh_lib.batch_sharding(mesh)))
    for _ in range(2):
      state, metrics = fn(state, batch)
    states.append((state, metrics))
  (s1, m1), (s4, m4) = states
  np.testing.assert_allclose(m4['train/loss'], m1['train/loss'], rtol=1e-5)
  np.testing.assert_allclose(m4['train/grad_norm'], m1['train/grad_norm'], rtol=1e-4)
  for a, b in zip(jax.tree.leaves(s4['params']), jax.tree.leaves(s1['params'])):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_fixed_and_scheduled_temperature():
  c, mesh, model, params, batch = _setup([('data', 8)], **{'temperature.type': 'fixed',
                                                           'temperature.value': 7.0})
  tx = optim.make_optimizer(c, params)
  state = {'step': jnp.int32(0), 'params': params, 'opt': tx.init(params),
           'skipped': jnp.zeros((2,), jnp.int32)}
  fn = jax.jit(functools.partial(
      step_lib.train_step, model=model, tx=tx,
      loss_fn=losses.make_loss_fn('softmax', 'gather', mesh),
      schedule=optim.make_schedule(c), seed=0, temperature=optim.make_temperature(c)))
  new_state, metrics = fn(state, batch)
  assert float(metrics['train/t']) == pytest.approx(7.0)
  assert float(new_state['params']['t']) == float(params['t'])  # Unused: not updated.

  c.temperature.update(type='linear', init=10.0, end=100.0)
  c.total_steps = 90
  temp = optim.make_temperature(c)
  assert [float(temp(s, jnp.float32(0))) for s in (0, 45, 90)] == pytest.approx([10, 55, 100])
  c.temperature.type = 'annealed'
  with pytest.raises(ValueError, match=r"'annealed'.*learned.*fixed"):
    optim.make_temperature(c)


def test_loss_extras_come_from_the_batch():
  c, mesh, model, params, batch = _setup([('data', 8)], loss='multi_positive')
  batch['label'] = jax.device_put(np.arange(32, dtype=np.int32) // 2,
                                  mesh_lib.batch_sharding(mesh))
  tx = optim.make_optimizer(c, params)
  state = {'step': jnp.int32(0), 'params': params, 'opt': tx.init(params),
           'skipped': jnp.zeros((2,), jnp.int32)}
  fn = functools.partial(
      step_lib.train_step, model=model, tx=tx,
      loss_fn=losses.make_loss_fn('multi_positive', 'gather', mesh),
      schedule=optim.make_schedule(c), seed=0)
  _, metrics = jax.jit(functools.partial(fn, loss_extras={'labels': 'label'}))(state, batch)
  # Pairs (2i, 2i + 1) share a label: the loss differs from all-distinct labels.
  batch['label'] = jax.device_put(np.arange(32, dtype=np.int32), mesh_lib.batch_sharding(mesh))
  _, distinct = jax.jit(functools.partial(fn, loss_extras={'labels': 'label'}))(state, batch)
  assert abs(float(metrics['train/loss']) - float(distinct['train/loss'])) > 1e-3
  with pytest.raises(ValueError, match=r"extras\['labels'\]"):
    jax.jit(fn)(state, batch)  # No extras given: the loss names what it needs.
