"""Mesh construction and parameter sharding rules."""
import jax
import jax.numpy as jnp
import pytest
from jax.sharding import PartitionSpec as P

from mmcl.parallel import mesh as mesh_lib
from mmcl.parallel import partition


@pytest.mark.parametrize('config,shape', [
    ([('data', -1)], {'data': 8}),
    ([('data', 4), ('fsdp', 2)], {'data': 4, 'fsdp': 2}),
    ([('data', -1), ('fsdp', 4)], {'data': 2, 'fsdp': 4}),
])
def test_mesh_shapes(config, shape):
  mesh = mesh_lib.create_mesh(config)
  assert dict(mesh.shape) == shape
  assert mesh_lib.num_batch_shards(mesh) == 8
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)


@pytest.mark.parametrize('config,match', [
    ([('data', 3)], 'does not fit 8 devices'),
    ([('data', 2), ('fsdp', 2)], 'has 4 devices but 8'),
    ([('dta', -1)], "Unknown mesh axis 'dta'.*valid names"),
    ([('data', -1), ('fsdp', -1)], 'At most one'),
])
def test_bad_mesh_errors(config, match):
  with pytest.raises(ValueError, match=match):
    mesh_lib.create_mesh(config)


def test_fsdp_rules_shard_largest_divisible_dim():
  mesh = mesh_lib.create_mesh([('data', 4), ('fsdp', 2)])
  tree = {'img': {'kernel': jax.ShapeDtypeStruct((129, 256), jnp.float32),
                  'bias': jax.ShapeDtypeStruct((256,), jnp.float32)},
          'txt': {'embedding': jax.ShapeDtypeStruct((1000, 64), jnp.float32)},
          't': jax.ShapeDtypeStruct((), jnp.float32)}
  rules = [('txt/.*', 'replicate'), ('.*', 'fsdp')]
  got = partition.tree_shardings(tree, mesh, rules, min_size=1)
  assert got['img']['kernel'].spec == P(None, 'fsdp')  # 129 does not divide by 2.
  assert got['img']['bias'].spec == P('fsdp')
  assert got['txt']['embedding'].spec == P()
  assert got['t'].spec == P()


def test_optimizer_state_follows_parameter_rules():
  mesh = mesh_lib.create_mesh([('fsdp', 8)])
  tree = {'opt': ({'mu': {'img': {'kernel': jax.ShapeDtypeStruct((64, 64), jnp.float32)}}},),
          'params': {'img': {'kernel': jax.ShapeDtypeStruct((64, 64), jnp.float32)}}}
  got = partition.tree_shardings(tree, mesh, [('img/kernel', ('fsdp', None))], min_size=1)
  assert got['opt'][0]['mu']['img']['kernel'].spec == P('fsdp', None)
  assert got['params']['img']['kernel'].spec == P('fsdp', None)
  # The first matching rule wins, even when a later catch-all matches the full path.
  tree['params']['txt'] = {'kernel': jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  got = partition.tree_shardings(tree, mesh, [('img/.*', 'fsdp'), ('.*', 'replicate')],
                                 min_size=1)
  assert got['params']['img']['kernel'].spec == P('fsdp', None)
  assert got['opt'][0]['mu']['img']['kernel'].spec == P('fsdp', None)
  assert got['params']['txt']['kernel'].spec == P()


def test_small_tensors_and_no_fsdp_axis_replicate():
  tree = {'w': jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  mesh = mesh_lib.create_mesh([('fsdp', 8)])
  assert partition.tree_shardings(tree, mesh, [('.*', 'fsdp')])['w'].spec == P()
  mesh = mesh_lib.create_mesh([('data', 8)])
  assert partition.tree_shardings(tree, mesh, [('.*', 'fsdp')], min_size=1)['w'].spec == P()


def test_bad_rules():
  mesh = mesh_lib.create_mesh([('fsdp', 8)])
  tree = {'w': jax.ShapeDtypeStruct((64, 64), jnp.float32)}
  with pytest.raises(ValueError, match="Unknown sharding spec 'shard'"):
    partition.tree_shardings(tree, mesh, [('.*', 'shard')])
  with pytest.raises(ValueError, match='regex'):
    partition.tree_shardings(tree, mesh, [('(', 'fsdp')])
