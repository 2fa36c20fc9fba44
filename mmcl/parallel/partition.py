"""Parameter (and optimizer-state) shardings from regex rules on parameter paths.

`config.sharding_rules` is a list of `(regex, spec)` pairs, first full match wins:
  - 'replicate': a full copy on every device;
  - 'fsdp': shard the largest dimension divisible by the 'fsdp' axis size over it
    (replicated if the mesh has no 'fsdp' axis, the tensor is smaller than
    `min_fsdp_size` elements, or no dimension divides);
  - a tuple/list of axis names or None per dimension: an explicit PartitionSpec.
Optimizer-state leaves (Adam's mu, nu, ...) carry the parameter path as a suffix of their
own path, so the same rules shard them like their parameters.
"""
from collections.abc import Sequence
import re

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from mmcl.tree import path_str

MIN_FSDP_SIZE = 2**14


def _fsdp_spec(shape, mesh: Mesh, min_size: int) -> P:
  n = mesh.shape.get('fsdp', 1)
  size = 1
  for d in shape:
    size *= d
  if n == 1 or size < min_size:
    return P()
  for dim in sorted(range(len(shape)), key=lambda i: -shape[i]):
    if shape[dim] % n == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def _spec_for(name: str, shape, rules, mesh: Mesh, min_size: int) -> P:
  parts = name.split('/')
  suffixes = ['/'.join(parts[start:]) for start in range(len(parts))]
  # The first rule that matches the path or any suffix of it wins (so 'opt/0/mu/img/x'
  # follows a rule written for 'img/x', and ('img/.*', ...) before ('.*', ...) works).
  for pattern, spec in rules:
    for candidate in suffixes:
      if re.fullmatch(pattern, candidate):
        if spec == 'replicate' or not shape:
          return P()
        if spec == 'fsdp':
          return _fsdp_spec(shape, mesh, min_size)
        if isinstance(spec, (tuple, list)):
          if len(spec) != len(shape):
            raise ValueError(f'Sharding rule {pattern!r} -> {spec} has {len(spec)} dims but '
                             f'{name} has shape {shape}.')
          return P(*spec)
        raise ValueError(f'Unknown sharding spec {spec!r} for rule {pattern!r}; valid: '
                         "'replicate', 'fsdp', or a tuple of axis names / None per dimension.")
  return P()


def validate_rules(rules: Sequence[tuple[str, object]]):
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f'Sharding rule {rule!r} is not a (regex, spec) pair.')
    try:
      re.compile(rule[0])
    except re.error as e:
      raise ValueError(f'Sharding rule regex {rule[0]!r} is invalid: {e}') from e


def tree_shardings(tree, mesh: Mesh, rules, min_size: int = MIN_FSDP_SIZE):
  """NamedShardings for every leaf of `tree` (arrays or ShapeDtypeStructs)."""
  rules = [tuple(r) for r in rules]
  validate_rules(rules)

  def one(path, leaf):
    return NamedSharding(mesh, _spec_for(path_str(path), tuple(leaf.shape), rules, mesh, min_size))

  return jax.tree_util.tree_map_with_path(one, tree)
