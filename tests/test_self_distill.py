"""SigLIP 2's EMA teacher, SILC self-distillation and TIPS masked prediction (docs/siglip2.md):
formulas against float64 numpy, the ViT's token mask, the views' pp op, checkpoints, and a
short sharded run."""
import dataclasses
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from mmcl import checkpoint as checkpoint_lib
from mmcl.data import preprocess
from mmcl.losses import self_distill as sd_loss
from mmcl.models import posemb, vit
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import distill as distill_lib
from mmcl.train import ema as ema_lib
from mmcl.train import loop
from mmcl.train import metrics as metrics_lib
from mmcl.train import validate


def _softmax(x, axis=-1):
  e = np.exp(x - x.max(axis, keepdims=True))
  return e / e.sum(axis, keepdims=True)


def test_ema_update_matches_numpy():
  rng = np.random.default_rng(0)
  ema = ema_lib.Ema(decay=0.9, start_step=3)
  params = [{'w': rng.normal(size=(4, 3)), 'b': rng.normal(size=(3,))} for _ in range(7)]
  ref = {k: v.copy() for k, v in params[0].items()}
  with jax.enable_x64(True):
    state = jax.tree.map(jnp.asarray, params[0])
    for step in range(1, 7):  # params[step]: the parameters after update `step`.
      state = jax.jit(ema.update)(state, jax.tree.map(jnp.asarray, params[step]), step)
      d = 0.0 if step <= 3 else 0.9
      ref = {k: d * ref[k] + (1 - d) * params[step][k] for k in ref}
      for k in ref:
        np.testing.assert_allclose(np.asarray(state[k]), ref[k], rtol=1e-12)
  assert not np.allclose(ref['w'], params[6]['w'])  # From step 4 on it lags behind.


def test_ema_off_by_default_and_bad_decay_named():
  assert ema_lib.from_config(demo.get_config('tiny')) is None
  with pytest.raises(ValueError, match='config.ema.decay'):
    ema_lib.Ema(decay=1.0)


def test_local_to_global_matches_numpy():
  rng = np.random.default_rng(1)
  s, t, c = rng.normal(size=(5, 3, 7)), rng.normal(size=(5, 7)), rng.normal(size=(7,))
  p = _softmax((t - c) / 0.04)[:, None, :]
  ref = -np.mean(np.sum(p * np.log(_softmax(s / 0.1)), -1))
  # The loss computes in float32 (like the contrastive ones): 1e-5 of a float64 reference.
  got = sd_loss.local_to_global(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
                                jnp.asarray(c, jnp.float32), student_temp=0.1,
                                teacher_temp=0.04)
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)


def test_masked_prediction_matches_numpy_and_ignores_unmasked_tokens():
  rng = np.random.default_rng(2)
  s, t = rng.normal(size=(4, 6, 5)), rng.normal(size=(4, 6, 5))
  c = rng.normal(size=(5,))
  mask = rng.random((4, 6)) < 0.5
  mask[3] = False  # An image without masked tokens counts 0.
  ce = -np.sum(_softmax((t - c) / 0.05) * np.log(_softmax(s / 0.2)), -1)
  ref = np.mean([ce[i][mask[i]].mean() if mask[i].any() else 0.0 for i in range(4)])
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  fn = lambda s: sd_loss.masked_prediction(s, f32(t), jnp.asarray(mask), f32(c),
                                           student_temp=0.2, teacher_temp=0.05)
  got, grad = jax.value_and_grad(fn)(f32(s))
  np.testing.assert_allclose(float(got), ref, rtol=1e-5)
  assert np.all(np.asarray(grad)[~mask] == 0) and np.any(np.asarray(grad)[mask] != 0)


def test_update_center_matches_numpy():
  rng = np.random.default_rng(3)
  c, t = rng.normal(size=(6,)), rng.normal(size=(2, 3, 6))
  with jax.enable_x64(True):
    got = sd_loss.update_center(jnp.asarray(c), jnp.asarray(t), 0.9)
  np.testing.assert_allclose(np.asarray(got), 0.9 * c + 0.1 * t.reshape(-1, 6).mean(0),
                             rtol=1e-12)


@pytest.mark.parametrize('ratio,tokens', [(0.5, 16), (0.3, 10), (0.0, 4), (1.0, 5)])
def test_random_token_mask_has_exactly_the_fraction(ratio, tokens):
  mask = np.asarray(sd_loss.random_token_mask(jax.random.key(0), 64, tokens, ratio))
  assert np.all(mask.sum(1) == round(ratio * tokens))
  if 0 < ratio < 1:  # Positions differ between images.
    assert len({m.tobytes() for m in mask}) > 1


def _tiny_vit(**kw):
  return vit.ViT(width=16, depth=1, mlp_dim=32, num_heads=2, patch_size=4, num_classes=8, **kw)


def test_vit_mask_token_replaces_exactly_the_masked_patches():
  model = _tiny_vit()
  rng = np.random.default_rng(4)
  image = jnp.asarray(rng.normal(size=(2, 16, 16, 3)), jnp.float32)
  params = model.init(jax.random.key(0), image)['params']
  mask = sd_loss.random_token_mask(jax.random.key(1), 2, 16, 0.5)
  token = jnp.asarray(rng.normal(size=(16,)), jnp.float32)
  apply = jax.jit(lambda x, **kw: model.apply({'params': params}, x, **kw)[0])
  # Default and an all-False mask: today's output.
  np.testing.assert_array_equal(apply(image), apply(image, token_mask_BxN=None))
  np.testing.assert_allclose(apply(image), apply(
      image, token_mask_BxN=jnp.zeros((2, 16), bool), mask_token_D=token), rtol=1e-6)
  # Changing the pixels of a masked patch changes nothing; of an unmasked one, the output.
  patch = np.asarray(mask).reshape(2, 4, 4)
  masked_yx = np.argwhere(patch[0])[0]
  kept_yx = np.argwhere(~patch[0])[0]

  def poke(yx):
    x = np.array(image)
    x[0, 4 * yx[0]:4 * yx[0] + 4, 4 * yx[1]:4 * yx[1] + 4] += 5.0
    return apply(jnp.asarray(x), token_mask_BxN=mask, mask_token_D=token)

  base = apply(image, token_mask_BxN=mask, mask_token_D=token)
  np.testing.assert_array_equal(poke(masked_yx), base)
  assert not np.allclose(poke(kept_yx)[0], base[0])
  assert not np.allclose(base, apply(image))
  with pytest.raises(ValueError, match='mask_token_D'):
    model.apply({'params': params}, image, token_mask_BxN=mask)


def test_vit_param_tree_unchanged_and_smaller_crops_resample_posemb():
  model = _tiny_vit()
  image = jnp.zeros((2, 16, 16, 3))
  params = model.init(jax.random.key(0), image)['params']
  assert params['pos_embedding'].shape == (1, 16, 16)
  assert set(params) == {'embedding', 'pos_embedding', 'Transformer', 'head'}
  small = model.apply({'params': params}, jnp.ones((3, 8, 8, 3)))[1]['encoded']
  assert small.shape == (3, 4, 16)
  # A 2x2 grid of the resampled embeddings is the 4x4 grid's bilinear 2x downsampling.
  pos = np.asarray(params['pos_embedding']).reshape(4, 4, 16)
  got = np.asarray(posemb.resample(params['pos_embedding'], (2, 2))).reshape(2, 2, 16)
  np.testing.assert_allclose(got, np.asarray(jax.image.resize(
      jnp.asarray(pos), (2, 2, 16), 'bilinear')), rtol=1e-6)
  # And the ViT uses exactly those: stored at 2x2, nothing is resampled, same tokens.
  at_2x2 = {**params, 'pos_embedding': jnp.asarray(got.reshape(1, 4, 16))}
  same = model.apply({'params': at_2x2}, jnp.ones((3, 8, 8, 3)))[1]['encoded']
  np.testing.assert_allclose(np.asarray(same), np.asarray(small), rtol=1e-5, atol=1e-6)


def test_inception_crops_op_stacks_different_crops():
  import tensorflow as tf
  fn = preprocess.get_preprocess_fn(
      'inception_crops(3, 8, 5, 40, outkey="local_crops")|value_range(-1, 1, key="local_crops")')
  image = tf.reshape(tf.cast(tf.range(32 * 32 * 3) % 251, tf.uint8), (32, 32, 3))
  out = fn({'image': image, '_seed': tf.constant([1, 2], tf.int64)})
  crops = out['local_crops'].numpy()
  assert crops.shape == (3, 8, 8, 3) and crops.dtype == np.float32
  assert -1 <= crops.min() and crops.max() <= 1
  assert not np.allclose(crops[0], crops[1])
  with pytest.raises(ValueError, match='positive int'):
    preprocess.get_preprocess_fn('inception_crops(0, 8)')


def _distill_config(data_dir, **overrides):
  c = demo.get_config('siglip,tiny,distill')
  c.data_dir, c.progress_bar, c.evals = data_dir, False, {}
  c.update_from_flattened_dict(overrides)
  return c


def test_old_checkpoint_restores_when_ema_off(shapes_data_dir, tmp_path):
  """Today's state layout is unchanged with ema off; an old checkpoint under an EMA config
  is a named mismatch (not 'corrupt', so never moved aside)."""
  plain = demo.get_config('siglip,tiny')
  plain.data_dir = shapes_data_dir
  s = loop.setup(plain)
  assert set(s.abstract_state) == {'step', 'params', 'opt', 'skipped'}
  state = s.init_state(jax.random.key(0))
  ckpt = checkpoint_lib.Checkpointer(str(tmp_path), async_save=False)
  ckpt.save(3, state, force=True)
  restored = ckpt.restore(s.abstract_state, s.state_sharding)
  jax.tree.map(np.testing.assert_array_equal, restored, state)
  with_ema = loop.setup(_distill_config(shapes_data_dir))
  assert {'ema', 'self_distill'} <= set(with_ema.abstract_state)
  with pytest.raises(checkpoint_lib.CheckpointMismatch, match='config.ema.decay'):
    ckpt.restore_newest_good(with_ema.abstract_state, with_ema.state_sharding)
  assert ckpt.all_steps() == [3]
  ckpt.close()


def test_terms_are_off_before_the_switch_and_the_heads_held(shapes_data_dir):
  """Before start_step: zero loss and gradient, centres and heads unchanged; from it on,
  both terms and a gradient into the heads, the mask token and the image tower."""
  s = loop.setup(_distill_config(shapes_data_dir, total_steps=10))
  assert s.distill.start_step == 8
  state = s.init_state(jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {k: jnp.asarray(rng.uniform(-1, 1, v.shape), v.dtype) if v.dtype == np.float32
           else jnp.asarray(rng.integers(1, 200, v.shape), v.dtype)
           for k, v in s.batch_shapes.items()}
  fn = jax.jit(s.distill.value_and_grad)
  for step, on in ((7, False), (8, True)):
    state['step'] = jnp.asarray(step, jnp.int32)
    value, metrics, centres, grads = fn(state, batch, jax.random.key(1))
    heads = grads['self_distill']
    if not on:
      assert float(value) == 0 and all(float(v) == 0 for v in metrics.values())
      assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
      jax.tree.map(np.testing.assert_array_equal, centres, state['self_distill'])
    else:
      assert float(metrics['local_loss']) > 0 and float(metrics['masked_loss']) > 0
      assert float(jnp.abs(heads['mask_token']).max()) > 0
      assert float(jnp.abs(grads['img']['embedding']['kernel']).max()) > 0
      assert not np.allclose(centres['center'], state['self_distill']['center'])
    moved = jax.tree.map(lambda p: p + 1.0, state['params'])
    held = s.distill.hold_heads(moved, state['params'], state['step'])
    jax.tree.map(np.testing.assert_array_equal, held['self_distill'],
                 (moved if on else state['params'])['self_distill'])


def test_host_picked_phases_equal_the_traced_switch(shapes_data_dir):
  """The loop's two programs (terms off before start_step, on from it; 8 devices) leave
  the state and metrics the one lax.cond program leaves, step by step across the switch;
  the program before the switch runs none of the terms' FLOPs."""
  from mmcl.train import throughput
  s = loop.setup(_distill_config(shapes_data_dir, total_steps=10))
  assert s.distill.start_step == 8 and s.distill.phase is None
  traced = s.step_for.build(s.model, s.distill)
  rng = np.random.default_rng(0)
  batch = {k: rng.uniform(-1, 1, v.shape).astype(v.dtype) if v.dtype == np.float32
           else rng.integers(1, 200, v.shape).astype(v.dtype) for k, v in s.batch_shapes.items()}
  batch = jax.device_put(batch, {k: v.sharding for k, v in s.batch_shapes.items()})
  states = [s.init_state(jax.random.key(0)) for _ in range(2)]
  for state in states:  # Loop step 7 (state step 6) is two steps before the switch.
    state['step'] = jax.device_put(jnp.asarray(6, jnp.int32), s.state_sharding['step'])
  for step in (7, 8, 9, 10):
    states[0], got = s.step_for(step)(states[0], batch)
    states[1], ref = traced(states[1], batch)
    assert (float(got['train/self_distill/loss']) > 0) == (step >= 9)  # State step 8: on.
    for k in ref:
      np.testing.assert_allclose(got[k], ref[k], rtol=2e-5, atol=1e-6, err_msg=f'{k} {step}')
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-5, atol=1e-6),
                 states[0], states[1])
  off, on = s.step_for(8), s.step_for(9)
  assert throughput.step_flops(off) < 0.5 * throughput.step_flops(on)


def test_self_distill_needs_an_ema(shapes_data_dir, tmp_path):
  c = _distill_config(shapes_data_dir)
  c.ema.decay = None
  with pytest.raises(ValueError, match='config.ema.decay'):
    loop.run(c, str(tmp_path))


@pytest.mark.slow
def test_distill_run_losses_fall_and_resume_keeps_the_ema(shapes_data_dir, tmp_path):
  """EMA + SILC + TIPS on from step 1, sharded over data x fsdp; a resume from step 4
  reproduces the uninterrupted run's EMA at step 8."""
  c = _distill_config(shapes_data_dir, total_steps=8, ckpt_every=4, log_every=1,
                      **{'self_distill.start_fraction': 0.0, 'ema.decay': 0.9,
                         'mesh': (('data', 4), ('fsdp', 2))})
  workdir = str(tmp_path / 'run')
  loop.run(c, workdir)
  rows = [r for r in metrics_lib.read_metrics(workdir) if 'train/loss' in r]
  for name in ('train/loss', 'train/self_distill/local_loss',
               'train/self_distill/masked_loss'):
    values = [r[name] for r in rows]
    assert np.mean(values[-3:]) < np.mean(values[:3]), (name, values)
  s = loop.setup(c)
  ckpt = checkpoint_lib.Checkpointer(workdir)
  full = ckpt.restore(s.abstract_state, s.state_sharding, step=8)
  ckpt.close()
  assert not np.allclose(full['ema']['img']['head']['kernel'],
                         full['params']['img']['head']['kernel'])
  # config.ema.eval: tools/eval.py's restore reads the EMA weights instead of the params.
  from mmcl.train import checkpoint_eval
  c_ema = c.copy_and_resolve_references()
  c_ema.ema.eval = True
  _, _, weights, step = checkpoint_eval.restore_params(c_ema, workdir, 8)
  assert step == 8
  jax.tree.map(np.testing.assert_array_equal, weights, full['ema'])
  again = str(tmp_path / 'again')
  shutil.copytree(workdir, again)
  shutil.rmtree(os.path.join(again, 'ckpt', '8'))
  shutil.rmtree(os.path.join(again, 'data_state', '8'))
  loop.run(c, again)
  ckpt = checkpoint_lib.Checkpointer(again)
  resumed = ckpt.restore(s.abstract_state, s.state_sharding, step=8)
  ckpt.close()
  for key in ('ema', 'params', 'self_distill'):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-6, atol=1e-7),
                 resumed[key], full[key])


def test_micro_batched_terms_equal_the_full_batch(shapes_data_dir):
  """accum_steps=4 (micro-batches of 8 rows, sharded data x fsdp over 8 devices) gives the
  full batch's value, metrics, centres and gradient; one micro-batch alone does not."""
  mesh_cfg = {'mesh': (('data', 4), ('fsdp', 2)), 'self_distill.start_fraction': 0.0}
  s = loop.setup(_distill_config(shapes_data_dir, **mesh_cfg))
  assert s.distill.accum_steps == 1  # config.accum_steps' default.
  full = s.distill.fixed('on')
  micro = dataclasses.replace(full, accum_steps=4)
  state = s.init_state(jax.random.key(0))
  leaves, treedef = jax.tree.flatten(state['ema'])  # A teacher unlike the student.
  state['ema'] = treedef.unflatten([x + 0.05 * jax.random.normal(jax.random.key(i), x.shape)
                                    for i, x in enumerate(leaves)])
  rng = np.random.default_rng(0)
  batch = {k: rng.uniform(-1, 1, v.shape).astype(v.dtype) if v.dtype == np.float32
           else rng.integers(1, 200, v.shape).astype(v.dtype) for k, v in s.batch_shapes.items()}
  batch = jax.device_put(batch, {k: v.sharding for k, v in s.batch_shapes.items()})
  sharding = mesh_lib.batch_sharding(s.mesh)
  key = jax.random.key(1)
  want = jax.jit(lambda st, b: full.value_and_grad(st, b, key))(state, batch)
  got = jax.jit(lambda st, b: micro.value_and_grad(st, b, key, sharding))(state, batch)

  def close(g, w, path=''):  # Two float32 summation orders: atol scaled by each leaf.
    atol = max(1e-7, 1e-5 * float(np.max(np.abs(w))))
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=atol, err_msg=path)
  jax.tree_util.tree_map_with_path(lambda p, g, w: close(g, w, jax.tree_util.keystr(p)),
                                   got, want)
  assert float(want[1]['local_loss']) > 0 and float(want[1]['masked_loss']) > 0
  # The test can fail: the first micro-batch (rows 0, 4, 8, ...) alone is another value.
  first = jax.tree.map(lambda x: x[::4], batch)
  alone = jax.jit(lambda st, b: full.value_and_grad(st, b, key))(state, first)
  assert abs(float(alone[0]) - float(want[0])) > 1e-3 * abs(float(want[0]))
  assert not np.allclose(alone[2]['patch_center'], want[2]['patch_center'], rtol=1e-3)


def test_distill_micro_batches_follow_grad_cache_and_are_checked(shapes_data_dir):
  c = _distill_config(shapes_data_dir, accum_steps=4)
  assert distill_lib.accum_steps(c) == 4
  c.self_distill.accum_steps = 2
  assert distill_lib.accum_steps(c) == 2
  c.self_distill.accum_steps = 3  # 32 rows do not split into 3 micro-batches over 8 shards.
  with pytest.raises(ValueError, match=r'config.self_distill.accum_steps=3 .* divisor'):
    validate.validate(c)
