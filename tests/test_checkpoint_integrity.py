"""Checkpoint integrity: unreadable or non-finite checkpoints are named and skipped, with a
fallback to the newest good one; a non-finite state is never saved; no teardown noise."""
import dataclasses
import glob
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from mmcl import checkpoint
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import loop
from mmcl.train import metrics as metrics_lib
from test_checkpoint import abstract_and_shardings, assert_state_equal, make_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def mesh():
  return mesh_lib.create_mesh([('data', 4), ('fsdp', 2)])


def truncate_data(step_dir):
  """Cuts every array data file of a checkpoint step short (a full disk, a killed copy)."""
  files = glob.glob(os.path.join(step_dir, 'default', '**', 'd', '*'), recursive=True)
  assert files
  for f in files:
    os.truncate(f, os.path.getsize(f) // 3)


def with_nan(state):
  params = dict(state['params'], w=state['params']['w'] * jnp.nan)
  return dict(state, params=params)


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_unreadable_checkpoints_are_named_and_the_newest_good_one_restored(
    mesh, tmp_path, capsys):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=5)
  for step in (1, 2, 3):
    ckpt.save(step, make_state(mesh, step, scale=step), force=True)
  ckpt.wait()
  truncate_data(os.path.join(ckpt.directory, '3'))
  open(os.path.join(ckpt.directory, '2', 'default', '_METADATA'), 'w').close()  # Empty.
  abstract, shardings = abstract_and_shardings(make_state(mesh, 0))
  state, step = ckpt.restore_newest_good(abstract, shardings)
  assert step == 1
  assert_state_equal(state, make_state(mesh, 1, scale=1))
  out = capsys.readouterr().out
  assert 'checkpoint at step 3' in out and 'OUT_OF_RANGE' in out, out
  assert 'checkpoint at step 2' in out and '_METADATA' in out, out
  assert 'Fell back to step 1' in out, out
  # The bad ones are kept for inspection, out of orbax's reach (never resumed, never kept
  # in place of a good one).
  assert ckpt.all_steps() == [1]
  assert sorted(os.listdir(tmp_path / 'ckpt_corrupt')) == ['2', '3']
  # Step 3 bad again: set aside beside the first one, nothing overwritten.
  ckpt.save(3, make_state(mesh, 3), force=True)
  ckpt.wait()
  truncate_data(os.path.join(ckpt.directory, '3'))
  assert ckpt.restore_newest_good(abstract, shardings)[1] == 1
  assert sorted(os.listdir(tmp_path / 'ckpt_corrupt')) == ['2', '3', '3.1']
  ckpt.close()


def test_a_non_finite_checkpoint_is_named_and_skipped(mesh, tmp_path, capsys):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  ckpt.save(1, make_state(mesh, 1), force=True)
  # What flipped bytes can restore: NaN weights (written past the save check).
  ckpt._manager.save(2, args=checkpoint.ocp.args.StandardSave(with_nan(make_state(mesh, 2))))
  ckpt.wait()
  abstract, shardings = abstract_and_shardings(make_state(mesh, 0))
  with pytest.raises(checkpoint.CheckpointError, match=r'step 2 .*non-finite values in '
                     r'params/w\b'):
    ckpt.restore(abstract, shardings, 2)
  _, step = ckpt.restore_newest_good(abstract, shardings)
  assert step == 1
  assert 'non-finite values in params/w' in capsys.readouterr().out
  ckpt.close()


def test_a_non_finite_state_is_never_saved_so_keep_k_keeps_good_ones(mesh, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), keep=2, every=1)
  ckpt.save(1, make_state(mesh, 1))
  ckpt.save(2, make_state(mesh, 2))
  for step in (3, 4, 5):
    with pytest.raises(FloatingPointError, match=rf'step {step} has non-finite values in '
                       r'params/w: not saved; the newest checkpoint \(step 2\) is kept'):
      ckpt.save(step, with_nan(make_state(mesh, step)))
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


@pytest.mark.filterwarnings('error::pytest.PytestUnraisableExceptionWarning')
def test_no_good_checkpoint_lists_each_and_moves_nothing(mesh, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  for step in (1, 2):
    ckpt.save(step, make_state(mesh, step), force=True)
  ckpt.wait()
  for step in (1, 2):
    truncate_data(os.path.join(ckpt.directory, str(step)))
  abstract, shardings = abstract_and_shardings(make_state(mesh, 0))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r'No usable checkpoint(.|\n)*step 2: (.|\n)*step 1: '):
    ckpt.restore_newest_good(abstract, shardings)
  assert ckpt.all_steps() == [1, 2] and not os.path.exists(tmp_path / 'ckpt_corrupt')
  ckpt.close()


def test_a_failed_restore_is_one_message_without_orbax_teardown_noise(tmp_path):
  # Uncaught, orbax's failed read leaves its other reads behind: at exit they printed
  # hundreds of lines (tensorstore specs, 'Exception ignored', 'Event loop is closed').
  script = textwrap.dedent(f"""
      import glob, os
      import jax, jax.numpy as jnp, optax
      from jax.sharding import NamedSharding, PartitionSpec as P
      from mmcl import checkpoint
      mesh = jax.make_mesh((4, 2), ('data', 'fsdp'))
      params = {{f'w{{i}}': jax.device_put(jax.random.normal(jax.random.key(i), (256, 128)),
                                         NamedSharding(mesh, P('data', 'fsdp')))
                 for i in range(16)}}
      state = {{'params': params, 'opt': optax.adam(1e-3).init(params)}}
      ckpt = checkpoint.Checkpointer({str(tmp_path)!r})
      ckpt.save(1, state, force=True)
      ckpt.wait()
      for f in glob.glob({str(tmp_path)!r} + '/ckpt/1/default/**/d/*', recursive=True):
        os.truncate(f, 10)
      abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
      ckpt.restore(abstract, jax.tree.map(lambda x: x.sharding, state), 1)
      """)
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             PYTHONPATH=REPO, TF_CPP_MIN_LOG_LEVEL='3')
  r = subprocess.run([sys.executable, '-c', script], capture_output=True, text=True,
                     env=env, cwd=REPO, timeout=300)
  assert r.returncode == 1
  err = r.stderr[r.stderr.index('Traceback'):]
  last = err.strip().splitlines()[-1]
  assert last.startswith('mmcl.checkpoint.CheckpointError: The checkpoint at step 1 in ')
  assert 'cannot be read: ValueError: OUT_OF_RANGE' in last
  assert len(err.splitlines()) < 25, err
  for noise in ('Exception ignored', 'Event loop is closed', 'never retrieved'):
    assert noise not in r.stderr


def test_the_loop_falls_back_over_a_corrupt_checkpoint_and_never_saves_nan(
    shapes_data_dir, tmp_path, monkeypatch, capsys):
  c = demo.get_config('tiny')
  c.data_dir, c.progress_bar, c.evals = shapes_data_dir, False, {}
  c.total_steps, c.ckpt_every, c.log_every = 2, 1, 1
  s = loop.setup(c)  # One setup for both runs: the train step compiles once.
  monkeypatch.setattr(loop, 'setup', lambda *args, **kwargs: s)
  loop.run(c, str(tmp_path))
  truncate_data(str(tmp_path / 'ckpt' / '2'))

  def nan_from_step_3(state, batch):  # As corrupt weights would.
    state, metrics = s.train_step(state, batch)
    if int(state['step']) >= 3:
      state['params'] = jax.tree.map(lambda x: x * jnp.nan, state['params'])
    return state, metrics

  monkeypatch.setattr(loop, 'setup', lambda *args, **kwargs: dataclasses.replace(
      s, train_step=nan_from_step_3))
  c.total_steps = 4
  with pytest.raises(FloatingPointError, match=r'state at step 3 has non-finite values in '
                     r'params/.*not saved; the newest checkpoint \(step 2\) is kept'):
    loop.run(c, str(tmp_path))
  out = capsys.readouterr().out
  assert 'checkpoint at step 2' in out and 'OUT_OF_RANGE' in out, out
  assert 'Fell back to step 1' in out and 'Resumed from step 1' in out, out
  # Step 2 was trained again and saved; step 3 (NaN) was not.
  assert sorted(os.listdir(tmp_path / 'ckpt')) == ['1', '2']
  assert sorted(os.listdir(tmp_path / 'ckpt_corrupt')) == ['2', '2.data_state']
  steps = [r['step'] for r in metrics_lib.read_metrics(str(tmp_path)) if 'train/loss' in r]
  assert steps[:2] == [1, 2] and steps == sorted(set(steps)), steps
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  state = ckpt.restore(s.abstract_state, s.state_sharding, 2)
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))
  ckpt.close()
