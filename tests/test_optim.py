"""Optimizer and schedule: warmup + decay, masked weight decay, freezing, clipping."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import common
from mmcl.train import optim


def make_config(**overrides):
  c = common.base_config()
  c.total_steps = 100
  c.lr = 0.01
  c.schedule.warmup_steps = 10
  c.update_from_flattened_dict(overrides)
  return c


def reference_lr(step, *, lr, warmup, total, end_factor, name):
  """The documented schedule: linear warmup from 0, then decay to end_factor * lr."""
  warmup = min(warmup, total)
  if step < warmup:
    return lr * step / warmup
  frac = min((step - warmup) / max(total - warmup, 1), 1.0)
  end = lr * end_factor
  if name == 'cosine':
    return end + (lr - end) * 0.5 * (1 + math.cos(math.pi * frac))
  if name == 'linear':
    return lr + (end - lr) * frac
  return lr


@pytest.mark.parametrize('name', ['cosine', 'linear', 'constant'])
@pytest.mark.parametrize('end_factor', [0.0, 0.1])
def test_schedule_matches_reference(name, end_factor):
  c = make_config(**{'schedule.name': name, 'schedule.end_factor': end_factor})
  sched = optim.make_schedule(c)
  for step in list(range(0, 12)) + [30, 55, 80, 99, 100, 150]:
    want = reference_lr(step, lr=0.01, warmup=10, total=100, end_factor=end_factor, name=name)
    assert float(sched(step)) == pytest.approx(want, rel=1e-5, abs=1e-9), step
  assert float(sched(0)) == 0.0
  assert float(sched(10)) == pytest.approx(0.01)
  final = 0.01 * end_factor if name != 'constant' else 0.01
  assert float(sched(100)) == pytest.approx(final, abs=1e-9)


def test_cosine_midpoint_and_monotone():
  c = make_config(**{'schedule.end_factor': 0.2})
  sched = optim.make_schedule(c)
  assert float(sched(55)) == pytest.approx(0.01 * (0.2 + 0.8 * 0.5), rel=1e-5)
  values = np.array([float(sched(s)) for s in range(101)])
  assert np.all(np.diff(values[:11]) > 0) and np.all(np.diff(values[10:]) <= 1e-9)


def test_warmup_capped_at_total_steps():
  c = make_config(total_steps=30, **{'schedule.warmup_steps': 500})
  sched = optim.make_schedule(c)
  for step in (0, 1, 15, 29, 30):
    assert float(sched(step)) == pytest.approx(0.01 * step / 30, rel=1e-5, abs=1e-9), step


def test_zero_warmup_starts_at_peak():
  sched = optim.make_schedule(make_config(**{'schedule.warmup_steps': 0}))
  assert float(sched(0)) == pytest.approx(0.01)
  assert float(sched(100)) == pytest.approx(0.0, abs=1e-9)


def test_unknown_schedule_raises():
  with pytest.raises(ValueError, match=r"'exponential'.*cosine.*linear.*constant"):
    optim.make_schedule(make_config(**{'schedule.name': 'exponential'}))


def test_negative_warmup_raises():
  with pytest.raises(ValueError, match='warmup_steps'):
    optim.make_schedule(make_config(**{'schedule.warmup_steps': -1}))


def test_unknown_optimizer_raises():
  params = {'w': jnp.ones((2, 2))}
  with pytest.raises(ValueError, match=r"'sgd'.*adamw"):
    optim.make_optimizer(make_config(**{'optim.name': 'sgd'}), params)


def _params():
  return {
      'img': {'kernel': jnp.full((3, 4), 1.0), 'bias': jnp.full((4,), 1.0)},
      'txt': {'kernel': jnp.full((4, 2, 2), 2.0), 'scale': jnp.full((2,), 1.0)},
      't': jnp.asarray(1.5),
  }


def _run(tx, params, grads_fn, steps):
  state = tx.init(params)
  for i in range(steps):
    updates, state = tx.update(grads_fn(i), state, params)
    params = optax.apply_updates(params, updates)
  return params


def test_weight_decay_only_on_matrices():
  lr, wd = 0.1, 0.5
  c = make_config(lr=lr, **{'optim.weight_decay': wd, 'schedule.name': 'constant',
                            'schedule.warmup_steps': 0})
  params = _params()
  tx = optim.make_optimizer(c, params)
  zeros = jax.tree.map(jnp.zeros_like, params)
  out = _run(tx, params, lambda _: zeros, 3)
  # Zero gradients: AdamW's update is -lr * wd * p, so p -> p * (1 - lr * wd) per step.
  shrink = (1 - lr * wd) ** 3
  np.testing.assert_allclose(out['img']['kernel'], params['img']['kernel'] * shrink, rtol=1e-6)
  np.testing.assert_allclose(out['txt']['kernel'], params['txt']['kernel'] * shrink, rtol=1e-6)
  np.testing.assert_array_equal(out['img']['bias'], params['img']['bias'])
  np.testing.assert_array_equal(out['txt']['scale'], params['txt']['scale'])
  np.testing.assert_array_equal(out['t'], params['t'])


def test_freeze_keeps_matching_params_unchanged():
  c = make_config(**{'optim.freeze': 'img/.*', 'schedule.warmup_steps': 2})
  params = _params()
  tx = optim.make_optimizer(c, jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype),
                                            params))
  leaves, treedef = jax.tree.flatten(params)

  def grads(i):
    keys = jax.random.split(jax.random.key(i), len(leaves))
    return jax.tree.unflatten(
        treedef, [jax.random.normal(k, p.shape) for k, p in zip(keys, leaves)])

  out = _run(tx, params, grads, 5)
  for name in ('kernel', 'bias'):
    np.testing.assert_array_equal(out['img'][name], params['img'][name])
  for got, old in ((out['txt']['kernel'], params['txt']['kernel']),
                   (out['txt']['scale'], params['txt']['scale']), (out['t'], params['t'])):
    assert np.all(np.asarray(got) != np.asarray(old))


def test_freeze_matching_nothing_raises():
  c = make_config(**{'optim.freeze': 'image/.*'})
  with pytest.raises(ValueError, match="'image/.*'.*matches no parameter"):
    optim.make_optimizer(c, _params())


def test_freeze_is_a_full_match():
  # 'img' alone is not a full path of any leaf, so it matches nothing.
  with pytest.raises(ValueError, match='matches no parameter'):
    optim.make_optimizer(make_config(**{'optim.freeze': 'img'}), _params())


def _first_update(grad_clip, grads):
  lr = 0.1
  c = make_config(lr=lr, **{'optim.grad_clip': grad_clip, 'optim.weight_decay': 0.0,
                            'optim.eps': 1.0, 'schedule.name': 'constant',
                            'schedule.warmup_steps': 0})
  params = {'w': jnp.zeros((2, 2)), 'b': jnp.zeros((3,))}
  tx = optim.make_optimizer(c, params)
  updates, _ = tx.update(grads, tx.init(params), params)
  return updates


def test_gradient_clipping_bounds_the_update():
  grads = {'w': jnp.full((2, 2), 1e6), 'b': jnp.asarray([1e6, -2e6, 0.0])}
  flat = np.concatenate([np.ravel(g) for g in jax.tree.leaves(grads)]).astype(np.float64)
  norm = np.linalg.norm(flat)
  updates = _first_update(1.0, grads)
  # First Adam step (bias-corrected): update = -lr * g / (|g| + eps), eps = 1 here, with g
  # the gradient rescaled to global norm 1.
  for key in grads:
    g = np.asarray(grads[key], np.float64) / norm
    np.testing.assert_allclose(updates[key], -0.1 * g / (np.abs(g) + 1.0), rtol=1e-5,
                               atol=1e-9)
  assert max(np.abs(u).max() for u in jax.tree.leaves(updates)) < 0.1 * 0.5
  # Without clipping the huge gradient saturates Adam: |update| ~ lr.
  unclipped = _first_update(0.0, grads)
  np.testing.assert_allclose(np.abs(unclipped['w']), 0.1, rtol=1e-5)


def test_small_gradients_are_not_clipped():
  grads = {'w': jnp.full((2, 2), 0.1), 'b': jnp.asarray([0.1, -0.2, 0.0])}
  a, b = _first_update(1.0, grads), _first_update(0.0, grads)
  for key in grads:
    np.testing.assert_allclose(a[key], b[key], rtol=1e-6)
