"""Device mesh from config, and the batch axes the global batch is sharded over.

`config.mesh` lists `(axis_name, size)` pairs, e.g. `[('data', -1)]` or
`[('data', 4), ('fsdp', 2)]`; one size may be -1 ("all remaining devices").

All axes are `AxisType.Auto`: mmcl lets XLA's partitioner place activations from the
parameter and batch shardings (GSPMD style), and writes collectives by hand only where it
matters (the loss exchange, MoE dispatch) inside `jax.shard_map`. JAX 0.10's
`jax.make_mesh` defaults to Explicit axes, which would force sharding annotations on
every op of the models; we decide that here, once.
"""
from collections.abc import Sequence
import math

import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

# 'data' and 'fsdp' both shard the batch; 'fsdp' also shards parameters and optimizer
# state. 'expert' (MoE) and 'model' are reserved for expert and tensor parallelism.
VALID_AXES = ('data', 'fsdp', 'expert', 'model')
BATCH_AXES = ('data', 'fsdp', 'expert')


def mesh_shape(mesh_config: Sequence[tuple[str, int]], num_devices: int) -> dict[str, int]:
  """Resolves a mesh config to concrete axis sizes, validating it against the devices."""
  axes = [tuple(a) for a in mesh_config]
  if not axes:
    raise ValueError(f'config.mesh is empty; give axes like [("data", -1)]; valid names: {VALID_AXES}')
  for axis in axes:
    if len(axis) != 2:
      raise ValueError(f'config.mesh entry {axis!r} is not a (name, size) pair.')
  names = [name for name, _ in axes]
  for name in names:
    if name not in VALID_AXES:
      raise ValueError(f'Unknown mesh axis {name!r} in config.mesh={axes}; valid names: {VALID_AXES}')
  if len(set(names)) != len(names):
    raise ValueError(f'Repeated mesh axis name in config.mesh={axes}.')
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f'At most one mesh axis may have size -1; got config.mesh={axes}.')
  known = math.prod(s for s in sizes if s != -1)
  if any(s == 0 or s < -1 for s in sizes) or num_devices % known:
    raise ValueError(f'config.mesh={axes} does not fit {num_devices} devices.')
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(
        f'config.mesh={axes} has {math.prod(sizes)} devices but {num_devices} are available; '
        'use -1 for one axis to take the remaining devices.')
  return dict(zip(names, sizes))


def create_mesh(mesh_config: Sequence[tuple[str, int]], devices=None) -> Mesh:
  """The mesh of `config.mesh` over `devices` (default: every device of every process).

  Devices may come from any backend, including a TPU topology description (tools/compile.py).
  Devices of several slices (multi-slice TPU: `slice_index` differs) are laid out with the
  slices along the first batch axis, so only that axis's collectives cross the slower
  data-centre network (DCN); every other axis stays within a slice's ICI.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = mesh_shape(mesh_config, len(devices))
  axis_types = (jax.sharding.AxisType.Auto,) * len(shape)
  slices = len({getattr(d, 'slice_index', 0) for d in devices})
  if slices == 1:
    try:
      return jax.make_mesh(tuple(shape.values()), tuple(shape.keys()),
                           axis_types=axis_types, devices=devices)
    except NotImplementedError:  # An axis that is no product of physical axes (4 of 8x8x8).
      grid = mesh_utils.create_device_mesh(tuple(shape.values()), devices,
                                           allow_split_physical_axes=True)
      return Mesh(grid, tuple(shape.keys()), axis_types=axis_types)
  outer = next((a for a in shape if a in BATCH_AXES), None)
  if outer is None or shape[outer] % slices:
    raise ValueError(
        f'{slices} slices need a batch axis ({BATCH_AXES}) whose size divides by {slices} to '
        f'span them; config.mesh={list(map(tuple, mesh_config))} resolves to {shape}.')
  dcn = tuple(slices if a == outer else 1 for a in shape)
  ici = tuple(n // slices if a == outer else n for a, n in shape.items())
  grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
  return Mesh(grid, tuple(shape.keys()), axis_types=axis_types)


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes that shard the batch dimension, in mesh order."""
  return tuple(a for a in mesh.axis_names if a in BATCH_AXES)


def num_batch_shards(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Sharding of a global batch array: leading dimension split over the batch axes."""
  return NamedSharding(mesh, P(batch_axes(mesh)))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())
