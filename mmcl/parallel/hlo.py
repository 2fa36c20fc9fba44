"""Logical collectives of a compiled step, with their sizes: the communication check.

`collectives(compiled)` lists every all-reduce, all-gather, reduce-scatter, all-to-all and
collective-permute of an executable (`jax.jit(f).lower(...).compile()` or its `as_text()`)
as it executes, not as its text shows it:
  - an asynchronous pair (`*-start` / `*-done`) is one collective;
  - the TPU compiler splits one asynchronous collective over several fusions
    ("async collective fusion": a start, continuations, a done, all holding a copy of the
    op with the same `chain_id`): the chain is one collective;
  - a collective in a while loop's body (the ring loss, scanned layers) executes once per
    iteration: `executions` is the product of the enclosing loops' known trip counts.
Sizes are per device and per execution, in bytes:
  - `bytes`: the logical array the collective works on: the all-reduced operand, the
    gathered result, the reduce-scattered input (result x group size), the all-to-all or
    permuted operand. Summed over a step this is what an analytic count predicts
    (e.g. gradient all-reduce bytes = parameter bytes under data parallelism).
  - `wire_bytes`: what one device sends with a ring (bandwidth-optimal) algorithm over a group
    of n: all-reduce 2(n-1)/n x bytes, all-gather and reduce-scatter (n-1)/n x bytes,
    all-to-all (n-1)/n x bytes, collective-permute bytes. The roofline uses it.
XLA combines small collectives into one tuple-shaped op (e.g. every gradient in one
all-reduce); each entry keeps its leaf shapes, so callers can check them leaf by leaf.
"""
import collections
import dataclasses
import math
import re

import jax
import numpy as np

KINDS = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')
_BITS = {'pred': 8, 's4': 4, 'u4': 4, 's8': 8, 'u8': 8, 's16': 16, 'u16': 16, 'f16': 16,
         'bf16': 16, 's32': 32, 'u32': 32, 'f32': 32, 's64': 64, 'u64': 64, 'f64': 64,
         'c64': 64, 'c128': 128}
_OP_RE = re.compile(r'^\s*(?:ROOT\s+)?%?(\S+)\s*=\s*(.*?)\s(' + '|'.join(KINDS) +
                    r')(-start)?\(')
_SHAPE_RE = re.compile(r'\b([a-z]+\d*(?:e\d+m\d+\w*)?)\[([\d,]*)\]')
_META_RE = re.compile(r'op_name="([^"]*)"')
_HEADER_RE = re.compile(r'^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$')
_CALL_RE = re.compile(r'\b(calls|to_apply|body|condition|branch_computations)='
                      r'(\{[^}]*\}|%?[\w.\-]+)')
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


@dataclasses.dataclass(frozen=True)
class Collective:
  kind: str  # One of KINDS.
  name: str  # The HLO instruction name (of the chain's first piece).
  shapes: tuple[tuple[str, tuple[int, ...]], ...]  # Result leaves: (dtype, dims).
  group_size: int  # Devices in each replica group.
  bytes: int  # Logical bytes per device and execution (see the module docstring).
  op_name: str  # JAX's op_name metadata: where in the program it came from.
  executions: int = 1  # Per step: the trip counts of the enclosing while loops.
  group: tuple[int, ...] = ()  # The first replica group (logical device ids), if printed.

  @property
  def wire_bytes(self) -> float:
    n = self.group_size
    if self.kind == 'all-reduce':
      return 2 * (n - 1) / n * self.bytes
    if self.kind == 'collective-permute':
      return float(self.bytes)
    return (n - 1) / n * self.bytes


def _leaf_bytes(dtype: str, dims: tuple[int, ...]) -> int:
  if dtype not in _BITS and not dtype.startswith('f8'):
    raise ValueError(f'Unknown HLO element type {dtype!r}.')
  return math.prod(dims) * _BITS.get(dtype, 8) // 8


def _iota_groups(groups: int, size: int, dims: str, perm: str | None) -> np.ndarray:
  ids = np.arange(groups * size).reshape([int(d) for d in dims.split(',')])
  if perm:
    ids = ids.transpose([int(p) for p in perm.split(',')])
  return ids.reshape(groups, size)


def _first_group(line: str) -> tuple[int, ...]:
  """The first replica group's logical device ids, from any of the forms XLA prints."""
  m = re.search(r'replica_groups=\{\{([\d,]*)\}', line)  # {{0,1,2,3},{4,5,6,7}}
  if m:
    return tuple(int(i) for i in m.group(1).split(','))
  m = re.search(r'replica_groups=\[(\d+),(\d+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?', line)
  if m:  # Iota: [groups, size]<=[dims]T(perm)
    return tuple(int(i) for i in _iota_groups(int(m.group(1)), int(m.group(2)),
                                              m.group(3), m.group(4))[0])
  m = _MESH_GROUPS_RE.search(line)  # mesh['a'=4,'b'=2] {'a'}, maybe with device_ids.
  if m:
    return _mesh_group(m)
  m = re.search(r'source_target_pairs=\{((?:\{[\d,]*\},?)*)\}', line)  # collective-permute
  if m:
    return tuple(sorted({int(i) for i in re.findall(r'\d+', m.group(1))}))
  return ()


_MESH_GROUPS_RE = re.compile(
    r"replica_groups=mesh\[([^\]]*)\](?:,\s*device_ids=\((\[[\d,]+\](?:T\([\d,]+\))?|[\d,]*)\))?"
    r"\s*\{([^}]*)\}")


def _mesh_group(m) -> tuple[int, ...]:
  """The first group of `replica_groups=mesh['a'=2,'b'=4] [, device_ids=(...)] {'b'}`:
  devices varying over the named axes, the others at index 0."""
  sizes = [(a, int(n)) for a, n in re.findall(r"'(\w+)'=(\d+)", m.group(1))]
  shape = [n for _, n in sizes]
  ids = np.arange(math.prod(shape))
  if m.group(2):
    iota = re.match(r'\[([\d,]+)\](?:T\(([\d,]+)\))?$', m.group(2))
    if iota:
      ids = _iota_groups(1, ids.size, iota.group(1), iota.group(2))[0]
    else:
      ids = np.array([int(i) for i in m.group(2).split(',')])
  grid = ids.reshape(shape)
  named = re.findall(r"'(\w+)'", m.group(3))
  index = tuple(slice(None) if a in named else 0 for a, _ in sizes)
  return tuple(int(i) for i in grid[index].reshape(-1))


def _group_size(group: tuple[int, ...], line: str, num_devices: int | None) -> int:
  """Devices per replica group: the printed first group's, else every device."""
  if group:
    return len(group)
  if num_devices is None:
    raise ValueError(f'No replica groups in {line[:400]!r}; pass num_devices.')
  return num_devices  # replica_groups={}: every device.


def _computations(text: str) -> tuple[dict[str, list[str]], str]:
  """{computation name: its instruction lines}, and the entry's name. Lines outside any
  computation (an HLO snippet) form an entry of their own."""
  comps, entry, current = {'': []}, '', ''
  for line in text.splitlines():
    m = _HEADER_RE.match(line)
    if m and not line[:1].isspace():
      current = m.group(2)
      comps[current] = []
      if m.group(1):
        entry = current
      continue
    comps[current].append(line)
  return comps, entry


def _executions(comps: dict[str, list[str]], entry: str) -> dict[str, int]:
  """How many times each computation runs per execution of the entry."""
  calls = collections.defaultdict(list)  # callee -> [(caller, times per caller run)]
  for caller, lines in comps.items():
    for line in lines:
      trips = _TRIP_RE.search(line)
      for how, callees in _CALL_RE.findall(line):
        times = int(trips.group(1)) if how == 'body' and trips else 1
        for callee in re.findall(r'[\w.\-]+', callees):
          calls[callee].append((caller, times))
  memo = {}

  def runs(name, seen=()):
    if name == entry or name not in calls or name in seen:
      return 1
    if name not in memo:
      memo[name] = max(1, sum(runs(c, seen + (name,)) * t for c, t in calls[name]))
    return memo[name]
  return {name: runs(name) for name in comps}


def collectives(compiled_or_text, num_devices: int | None = None,
                keep_trivial: bool = False) -> list[Collective]:
  """Every logical collective in the HLO, in program order (see the module docstring).

  Collectives over groups of one device move nothing (a one-device mesh keeps them) and are
  left out unless `keep_trivial`.
  """
  text = compiled_or_text if isinstance(compiled_or_text, str) else compiled_or_text.as_text()
  comps, entry = _computations(text)
  runs = _executions(comps, entry)
  found, chains = [], {}
  for comp, lines in comps.items():
    for line in lines:
      m = _OP_RE.match(line)
      if not m:
        continue
      name, result_type, kind, start = m.groups()
      shapes = tuple((dt, tuple(int(d) for d in dims.split(',') if d))
                     for dt, dims in _SHAPE_RE.findall(result_type))
      if start and kind != 'all-reduce':
        shapes = shapes[len(shapes) // 2:]  # (operands..., results...): keep the results.
      first = _first_group(line)
      group = _group_size(first, line, num_devices)
      if group == 1 and not keep_trivial:
        continue
      size = sum(_leaf_bytes(dt, dims) for dt, dims in shapes)
      if kind == 'reduce-scatter':
        size *= group
      meta = _META_RE.search(line)
      c = Collective(kind, name, shapes, group, size, meta.group(1) if meta else '',
                     runs[comp], first)
      chain = re.search(r'chain_id="(\d+)"', line)
      if chain:  # One piece of a collective split over fusions: count the chain once.
        key = (kind, chain.group(1))
        if key in chains:
          i = chains[key]
          found[i] = dataclasses.replace(found[i], executions=max(found[i].executions,
                                                                  c.executions))
          continue
        chains[key] = len(found)
      found.append(c)
  return found


def mesh_axes(c: Collective, mesh) -> tuple[str, ...]:
  """The mesh axes a collective's replica group spans (logical ids index `mesh.devices`)."""
  if not c.group:
    return tuple(mesh.axis_names) if c.group_size == mesh.size else ()
  coords = np.array(np.unravel_index(np.array(c.group), mesh.devices.shape))
  return tuple(a for a, row in zip(mesh.axis_names, coords) if len(set(row)) > 1)


def summary(colls: list[Collective]) -> dict[str, dict[str, float]]:
  """{kind: {'count', 'executions', 'bytes', 'wire_bytes'}} per step, over the kinds present
  (`count`: logical collectives in the program; bytes: summed over executions)."""
  out = collections.defaultdict(
      lambda: {'count': 0, 'executions': 0, 'bytes': 0, 'wire_bytes': 0.0})
  for c in colls:
    row = out[c.kind]
    row['count'] += 1
    row['executions'] += c.executions
    row['bytes'] += c.bytes * c.executions
    row['wire_bytes'] += c.wire_bytes * c.executions
  return {k: dict(v) for k, v in out.items()}


def format_table(colls: list[Collective], mesh=None) -> str:
  """One line per logical collective: kind, bytes, executions, group, mesh axes, source."""
  lines = [f'{"kind":<19} {"bytes":>13} {"x":>5} {"group":>5} {"axes":<14} {"leaves":>6}  op']
  for c in colls:
    axes = ','.join(mesh_axes(c, mesh)) if mesh is not None else ''
    lines.append(f'{c.kind:<19} {c.bytes:>13,} {c.executions:>5} {c.group_size:>5} '
                 f'{axes:<14} {len(c.shapes):>6}  {c.op_name[-60:]}')
  return '\n'.join(lines)


def data_parallel_problems(colls: list[Collective], *, param_shapes, embedding_bytes: int,
                           max_scalars: int = 16) -> list[str]:
  """Why `colls` is not the minimal communication of a data-parallel contrastive step.

  Expected, and nothing else: all-reduces whose non-scalar leaves add up to exactly the
  parameter bytes (the gradients, in any grouping XLA combines them into) plus at most
  `max_scalars` scalar leaves (loss sums, scalar-parameter gradients); the loss's embedding
  exchange: all-gathers of one [B, D] embedding matrix (`embedding_bytes`) each, at most
  two, and as many reduce-scatters of the same size (their gradients). `param_shapes`: a
  tree of arrays / ShapeDtypeStructs. Returns [] when the step is minimal.
  """
  leaves = jax.tree.leaves(param_shapes)
  param_bytes = sum(x.size * x.dtype.itemsize for x in leaves if x.ndim)
  problems = []
  by_kind = collections.defaultdict(list)
  for c in colls:
    by_kind[c.kind].append(c)
  reduced = sum(_leaf_bytes(dt, dims) for c in by_kind['all-reduce']
                for dt, dims in c.shapes if dims)
  scalars = sum(1 for c in by_kind['all-reduce'] for _, dims in c.shapes if not dims)
  if reduced != param_bytes:
    problems.append(f'all-reduce of {reduced:,} non-scalar bytes; the gradients are '
                    f'{param_bytes:,}: ' + _where(by_kind['all-reduce']))
  if scalars > max_scalars:
    problems.append(f'{scalars} scalar all-reduce leaves (at most {max_scalars} expected).')
  for kind in ('all-gather', 'reduce-scatter'):
    odd = [c for c in by_kind[kind] if c.bytes != embedding_bytes]
    if odd:
      problems.append(f'{kind} not of one [B, D] embedding ({embedding_bytes:,} bytes): ' +
                      _where(odd))
    if len(by_kind[kind]) > 2:
      problems.append(f'{len(by_kind[kind])} {kind}s; the loss exchanges at most 2 embeddings: '
                      + _where(by_kind[kind]))
  if len(by_kind['all-gather']) != len(by_kind['reduce-scatter']):
    problems.append(f'{len(by_kind["all-gather"])} all-gathers but '
                    f'{len(by_kind["reduce-scatter"])} reduce-scatters (their gradients).')
  for kind in ('all-to-all', 'collective-permute'):
    if by_kind[kind]:
      problems.append(f'unexpected {kind}: ' + _where(by_kind[kind]))
  return problems


def _where(colls: list[Collective]) -> str:
  def source(c):  # A combined op's op_name lists every source; the first says enough.
    name = c.op_name or c.name
    return name if len(name) <= 120 else f'{name[:120]}... ({len(c.shapes)} leaves)'
  return '; '.join(f'{c.kind} {c.bytes:,} B from {source(c)}' for c in colls)
