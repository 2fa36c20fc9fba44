"""Tree helpers every layer may use: path names, flat '/'-joined dicts, shape diffs."""
from collections.abc import Mapping
from typing import Any

import jax


def path_str(path) -> str:
  """'img/Transformer/encoderblock_0/...' from a jax tree path."""
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  return '/'.join(parts)


def flatten(tree: Mapping[str, Any], prefix: str = '') -> dict[str, Any]:
  """{'a': {'b': x}} -> {'a/b': x}."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, Mapping):
      out.update(flatten(v, f'{prefix}{k}/'))
    else:
      out[f'{prefix}{k}'] = v
  return out


def unflatten(flat: Mapping[str, Any]) -> dict:
  """{'a/b': x} -> {'a': {'b': x}}."""
  tree: dict = {}
  for name, v in flat.items():
    *parents, leaf = name.split('/')
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = v
  return tree


def diff_shapes(got: Mapping[str, tuple], want: Mapping[str, tuple], label: str = ''):
  """(names missing from `got`, names `want` lacks, 'name: <label>shape vs model shape' for
  the shared names whose shapes differ), each sorted. Maps are {name: shape}."""
  missing, extra = sorted(set(want) - set(got)), sorted(set(got) - set(want))
  bad = sorted(f'{k}: {label}{tuple(got[k])} vs model {tuple(want[k])}'
               for k in set(got) & set(want) if tuple(got[k]) != tuple(want[k]))
  return missing, extra, bad


def name_list(names: list[str], limit: int = 20) -> str:
  """'a, b, c ... (N in all)' for error messages; 'none' when empty."""
  more = f' ... ({len(names)} in all)' if len(names) > limit else ''
  return ', '.join(names[:limit]) + more if names else 'none'


def with_shardings(abstract, shardings):
  """ShapeDtypeStructs of `abstract` carrying `shardings` (a matching tree): what `lower`
  and orbax's restore take."""
  return jax.tree.map(lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
                      abstract, shardings)
