"""Orbax checkpoints: sharded round trip, periodic saves, keep-last-K, crash safety."""
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from mmcl import checkpoint
from mmcl.parallel import mesh as mesh_lib

# What orbax 0.12 appends to a step directory while that step is being written
# (orbax/checkpoint/_src/path/atomicity_types.py: TMP_DIR_SUFFIX); renamed when complete.
TMP_SUFFIX = '.orbax-checkpoint-tmp'


@pytest.fixture(scope='module')
def mesh():
  return mesh_lib.create_mesh([('data', 4), ('fsdp', 2)])


def make_state(mesh, step, scale=1.0):
  """A train-state-like pytree with arrays sharded in different ways over `mesh`."""
  params = {
      'w': jax.device_put(scale * jnp.arange(64.0).reshape(16, 4),
                          NamedSharding(mesh, P(('data', 'fsdp')))),
      'k': jax.device_put(scale * jnp.arange(48.0).reshape(4, 12) - 7,
                          NamedSharding(mesh, P('data', 'fsdp'))),
      'b': jax.device_put(scale * jnp.linspace(-1, 1, 4), NamedSharding(mesh, P())),
  }
  opt = optax.adam(1e-3).init(params)
  opt = jax.tree.map(lambda x: x + scale if x.dtype == jnp.float32 else x, opt)
  return {'step': jnp.asarray(step, jnp.int32), 'params': params, 'opt': opt}


def abstract_and_shardings(state):
  abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state)
  return abstract, jax.tree.map(lambda x: x.sharding, state)


def assert_state_equal(got, want):
  assert jax.tree.structure(got) == jax.tree.structure(want)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    assert g.shape == w.shape and g.dtype == w.dtype
    np.testing.assert_array_equal(np.asarray(g), np.asarray(w))


def test_round_trip_into_given_shardings(mesh, tmp_path):
  state = make_state(mesh, 7)
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=7)
  assert ckpt.save(7, state)
  ckpt.wait()
  abstract, shardings = abstract_and_shardings(state)
  # Restore into shardings that differ from the saved ones.
  shardings['params']['w'] = NamedSharding(mesh, P())
  shardings['params']['k'] = NamedSharding(mesh, P('fsdp', 'data'))
  shardings['params']['b'] = NamedSharding(mesh, P('data'))
  restored = ckpt.restore(abstract, shardings)
  assert_state_equal(restored, state)
  for leaf, sharding in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
    assert leaf.sharding.is_equivalent_to(sharding, leaf.ndim), (leaf.sharding, sharding)
  shard = restored['params']['k'].addressable_shards[0]
  assert shard.data.shape == (2, 3)  # [4, 12] over fsdp=2 x data=4.
  ckpt.close()
  # A fresh Checkpointer (a restarted job) finds it too.
  again = checkpoint.Checkpointer(str(tmp_path))
  assert again.latest_step() == 7
  assert_state_equal(again.restore(*abstract_and_shardings(state)), state)
  again.close()


def test_every_and_force(mesh, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=5, keep=10)
  state = make_state(mesh, 0)
  assert not ckpt.save(3, state)
  assert not ckpt.save(7, state)
  assert ckpt.save(5, state)
  assert ckpt.save(10, state)
  assert ckpt.save(12, state, force=True)
  ckpt.wait()
  assert not ckpt.save(10, state, force=True)  # Already saved: skipped.
  assert ckpt.all_steps() == [5, 10, 12]
  assert ckpt.latest_step() == 12
  ckpt.close()
  assert sorted(os.listdir(ckpt.directory)) == ['10', '12', '5']
  never = checkpoint.Checkpointer(str(tmp_path / 'never'), every=None)
  assert not never.save(5, state) and not never.save(0, state)
  assert never.save(5, state, force=True)
  never.close()
  assert never.all_steps() == [5]


def test_keep_last_k(mesh, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1, keep=2)
  for step in range(1, 6):
    assert ckpt.save(step, make_state(mesh, step, scale=float(step)))
  ckpt.close()
  assert ckpt.all_steps() == [4, 5]
  assert sorted(os.listdir(ckpt.directory)) == ['4', '5']
  abstract, shardings = abstract_and_shardings(make_state(mesh, 0))
  assert_state_equal(ckpt.restore(abstract, shardings, step=4), make_state(mesh, 4, 4.0))
  assert_state_equal(ckpt.restore(abstract, shardings), make_state(mesh, 5, 5.0))


def test_restore_without_checkpoint_raises(mesh, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path))
  assert ckpt.latest_step() is None and ckpt.all_steps() == []
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    ckpt.restore(*abstract_and_shardings(make_state(mesh, 0)))
  ckpt.close()


def test_half_written_checkpoint_is_never_picked_up(mesh, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=2)
  for step in (2, 4):
    ckpt.save(step, make_state(mesh, step, scale=float(step)))
  ckpt.close()
  # Simulate crashes in the middle of saving steps 6 and 8: orbax writes into
  # '<step>.orbax-checkpoint-tmp' and renames it only once complete. Partial contents.
  for step in (6, 8):
    tmp = os.path.join(ckpt.directory, f'{step}{TMP_SUFFIX}')
    shutil.copytree(os.path.join(ckpt.directory, '4'), tmp)
    os.remove(os.path.join(tmp, 'commit_success.txt'))
    shutil.rmtree(os.path.join(tmp, 'default', 'ocdbt.process_0'), ignore_errors=True)
  resumed = checkpoint.Checkpointer(str(tmp_path), every=2)
  assert resumed.latest_step() == 4
  assert resumed.all_steps() == [2, 4]
  abstract, shardings = abstract_and_shardings(make_state(mesh, 0))
  assert_state_equal(resumed.restore(abstract, shardings), make_state(mesh, 4, 4.0))
  # The resumed run can save the step whose earlier save crashed.
  assert resumed.save(6, make_state(mesh, 6, scale=6.0))
  resumed.close()
  assert resumed.latest_step() == 6
  assert_state_equal(resumed.restore(abstract, shardings), make_state(mesh, 6, 6.0))


def test_in_flight_async_save_is_not_latest_until_finished(mesh, tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every=1)
  ckpt.save(1, make_state(mesh, 1))
  ckpt.wait()
  big = {'step': jnp.asarray(2, jnp.int32),
         'params': {'w': jax.device_put(jnp.ones((2048, 1024)),
                                        NamedSharding(mesh, P('data')))}}
  ckpt.save(2, big)
  # Whatever is on disk while the save runs, only complete step directories are listed.
  names = os.listdir(ckpt.directory)
  assert all(n.isdigit() or n.endswith(TMP_SUFFIX) for n in names), names
  on_disk = checkpoint.Checkpointer(str(tmp_path))
  assert on_disk.latest_step() in (1, 2)
  on_disk.close()
  ckpt.close()
  assert sorted(os.listdir(ckpt.directory)) == ['1', '2']
