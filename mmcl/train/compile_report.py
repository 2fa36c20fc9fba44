"""What a config's step costs on given devices, from the compiler itself: the fit report.

`report(config, devices)` compiles the real train step (and the evaluators' embedding
steps) of `config` for `devices` (a TPU topology's, see mmcl.parallel.topology, or the
local ones) without running anything, and returns per-chip figures:
  - memory: parameters, optimizer state and batch (from their shardings), the compiler's
    temporaries and generated code, the peak (arguments + outputs - donated aliases +
    temporaries + code), the chip's capacity and the margin left; when the compiler
    refuses for memory, the figure it asked for and what would reduce it;
  - communication: every logical collective (mmcl.parallel.hlo) with its mesh axes, bytes
    and executions per step, the total wire bytes per chip beside the analytic minimum of
    the config's parallelism (gradient reduction, FSDP gathers, the loss's exchange);
  - compute: FLOPs per chip from `cost_analysis()`, the analytic model FLOPs, lower
    bounds on the step time from the chip's peaks (compute, HBM, ICI, DCN) and the MFU the
    largest bound implies.
"""
import math
import re
import time

import jax
import ml_collections
import numpy as np

from mmcl import tree
from mmcl.parallel import hlo
from mmcl.parallel import mesh as mesh_lib
from mmcl.parallel import topology
from mmcl.train import config_flops, loop, optim

_HEAD_RE = re.compile(r'(^|/)(head|img_head|txt_head)(/|$)')
EXCESS_TOLERANCE = 0.05  # Collectives beyond the minimum that a report flags.
_OOM_RE = re.compile(r'RESOURCE_EXHAUSTED|Ran out of memory', re.I)
_GIGS_RE = re.compile(r'\(([\d.]+)([KMGT])\)')
_UNIT = {'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}


def per_chip_bytes(tree, shardings) -> int:
  """Bytes one device holds of `tree` (ShapeDtypeStructs) under `shardings`."""
  total = 0
  for leaf, sharding in zip(jax.tree.leaves(tree), jax.tree.leaves(shardings)):
    shape = sharding.shard_shape(leaf.shape) if leaf.shape else ()
    total += math.prod(shape) * np.dtype(leaf.dtype).itemsize
  return total


def _cost(compiled) -> dict:
  cost = compiled.cost_analysis()
  return (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}


def memory(compiled) -> dict:
  """Per-device bytes of a compiled program, as its memory_analysis() assigns them."""
  m = compiled.memory_analysis()
  peak = (m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes +
          m.temp_size_in_bytes + m.generated_code_size_in_bytes)
  return dict(argument_bytes=int(m.argument_size_in_bytes),
              output_bytes=int(m.output_size_in_bytes), alias_bytes=int(m.alias_size_in_bytes),
              temp_bytes=int(m.temp_size_in_bytes),
              code_bytes=int(m.generated_code_size_in_bytes), peak_bytes=int(peak))


def oom_figures(message: str) -> dict:
  """{'required_bytes', 'available_bytes'} from the TPU compiler's out-of-memory error."""
  sizes = [float(n) * _UNIT[u] for n, u in _GIGS_RE.findall(message)]
  out = {}
  if len(sizes) >= 2:
    out['required_bytes'], out['available_bytes'] = int(sizes[0]), int(sizes[1])
  return out


def _advice(config, state_bytes: int, replicated_state_bytes: int, local_batch: int) -> list:
  """What would reduce a step's memory, most effective first, for this config."""
  tips = []
  axes = dict(map(tuple, config.mesh))
  if replicated_state_bytes > 0.2 * state_bytes and 'fsdp' not in axes:
    tips.append(f"an 'fsdp' mesh axis, e.g. config.mesh=(('data', -1), ('fsdp', 16)): "
                f'{replicated_state_bytes / 2**30:.2f} GiB of parameters and optimizer state '
                'are replicated on every chip now')
  if not _remat(config):
    tips.append("config.model.remat='full' (or 'dots'): recompute activations in the "
                'backward pass instead of keeping them')
  if config.get('accum_steps', 1) == 1 and local_batch > 1:
    tips.append(f'config.accum_steps=k: GradCache micro-batches of {local_batch}/k examples '
                'per chip, the same gradient')
  if config.loss.impl == 'gather':
    tips.append("config.loss.impl='ring': O(b) loss memory instead of b x B logit blocks")
  if config.optim.get('mu_dtype') in (None, 'float32'):
    tips.append("config.optim.mu_dtype='bfloat16': Adam's first moment in half the bytes")
  tips.append('a smaller config.batch_size (fewer examples per chip)')
  return tips


def analytic_min_wire_bytes(config, s: loop.Setup) -> dict:
  """Least wire bytes per chip per step for the config's parallelism (ring algorithms):
  each gradient reduced over the batch axes it is replicated on (all-reduce, or reduce-
  scatter over 'fsdp' plus an all-reduce of the shard over the rest), each FSDP-sharded
  parameter all-gathered once (twice under remat), and the loss's embedding exchange ('gather': each
  embedding's all-gather and its gradient's reduce-scatter, float32). Gradients count in
  the model's compute dtype, in which the compiler reduces them (a bf16 model's weights
  are cast to bf16 where used), except the float32 projection heads and scalars. None for
  what it cannot count (the ring's permutes, MoE all-to-alls)."""
  mesh = s.mesh
  batch_axes = mesh_lib.batch_axes(mesh)
  compute = np.dtype(jax.numpy.dtype(config.model.get('dtype', 'float32'))).itemsize
  grads = gathers = 0.0
  params = s.abstract_state['params']
  trained = _trained(config, params)
  frozen = frozen_towers(config, params)
  for (path, leaf), sharding, train in zip(jax.tree_util.tree_leaves_with_path(params),
                                           jax.tree.leaves(s.state_sharding['params']),
                                           jax.tree.leaves(trained)):
    if not train:  # No gradient (LiT's locked tower).
      continue
    float32 = not leaf.shape or _HEAD_RE.search(tree.path_str(path))
    full = math.prod(leaf.shape) * (np.dtype(leaf.dtype).itemsize if float32 else compute)
    spec_axes = {a for entry in sharding.spec if entry
                 for a in (entry if isinstance(entry, tuple) else (entry,))}
    sharded = math.prod(mesh.shape[a] for a in spec_axes)
    reduce_over = math.prod(mesh.shape[a] for a in batch_axes if a not in spec_axes)
    # Sharded over a batch axis: FSDP (gathered for use), except 'expert' (the tokens move).
    fsdp = math.prod(mesh.shape[a] for a in spec_axes if a in batch_axes and a != 'expert')
    if fsdp > 1:  # Gathered for use, its gradient reduce-scattered back.
      gathers += (fsdp - 1) / fsdp * full / (sharded / fsdp)
      grads += (fsdp - 1) / fsdp * full / (sharded / fsdp)
    if reduce_over > 1:
      grads += 2 * (reduce_over - 1) / reduce_over * full / sharded
  if _remat(config):
    gathers *= 2  # Remat recomputes the forward pass, gathering the weights again.
  n = mesh_lib.num_batch_shards(mesh)
  exchange = None
  if config.loss.impl != 'ring':
    gathered = ('txt',) if config.loss.name == 'sigmoid' else ('img', 'txt')  # SigLIP: texts.
    scattered = [t for t in gathered if t not in frozen]  # A locked tower's needs no grad.
    embed = config.model.get('embed_dim', 512)
    exchange = (len(gathered) + len(scattered)) * (n - 1) / n * config.batch_size * embed * 4
  total = (None if exchange is None or config.model.name == 'limoe' else
           grads + gathers + exchange)
  return dict(gradients=grads, fsdp_gathers=gathers, loss_exchange=exchange, total=total)


def _remat(config) -> bool:
  return str(config.model.get('remat', 'none')) not in ('none', 'False')


def _trained(config, params):
  """A tree of bools: False for what config.optim.freeze freezes."""
  return optim.trained_mask(config, params) or jax.tree.map(lambda _: True, params)


def frozen_towers(config, params) -> set:
  """'img' / 'txt' when every parameter of that two-tower tower is frozen."""
  towers = {}
  for (path, _), train in zip(jax.tree_util.tree_leaves_with_path(params),
                              jax.tree.leaves(_trained(config, params))):
    tower = tree.path_str(path).split('/')[0]
    towers[tower] = towers.get(tower, False) or train
  return {t for t in ('img', 'txt') if towers.get(t) is False}


def _slice_mesh(mesh):
  """The mesh of slice 0 alone: what a multi-slice program's device ids index (the TPU
  compiler emits one program per slice; the slices' exchange over the data-centre network
  does not appear in its HLO)."""
  index = np.vectorize(lambda d: getattr(d, 'slice_index', 0))(mesh.devices)
  slices = len(np.unique(index))
  for axis in range(index.ndim):
    if slices > 1 and np.any(np.diff(index, axis=axis)):
      keep = np.arange(mesh.devices.shape[axis] // slices)
      return jax.sharding.Mesh(np.take(mesh.devices, keep, axis=axis), mesh.axis_names)
  return mesh


def dcn_wire_bytes(config, s: loop.Setup, minimum: dict) -> float:
  """Analytic wire bytes per chip between slices: hierarchical reduction (within a slice
  first, then a ring over the slices of each chip's 1/k share), for the gradients and the
  loss's exchange; 0 on one slice."""
  slices = len({getattr(d, 'slice_index', 0) for d in s.mesh.devices.flat})
  if slices == 1:
    return 0.0
  per_slice = s.mesh.size // slices
  ring = (slices - 1) / slices
  grads = minimum['gradients'] / 2 + minimum['fsdp_gathers']  # ~ the bytes reduced.
  exchange = (minimum['loss_exchange'] or 0.0) / 2  # The gathered embeddings.
  return (2 * ring * grads + 2 * ring * exchange) / per_slice


def _compile(fn, *args):
  # Off the persistent compilation cache: an executable compiled for a topology's devices
  # (no TPU client here) is written to it but cannot be read back ("PjRtCompiler must be
  # constructed with a Client"), so an entry would only cost its write.
  cached = jax.config.jax_enable_compilation_cache
  jax.config.update('jax_enable_compilation_cache', False)
  try:
    start = time.perf_counter()
    compiled = fn.lower(*args).compile()
  finally:
    jax.config.update('jax_enable_compilation_cache', cached)
  return compiled, time.perf_counter() - start


def report(config: ml_collections.ConfigDict, devices=None, *, evals: bool = True,
           hlo_dir: str | None = None, executables: dict | None = None) -> dict:
  """The fit report of `config` on `devices` (module docstring); never raises for memory.

  `executables`, if given, receives each compiled program by name ('train_step',
  'embed_images', 'embed_texts'), so a caller can read them without compiling again.
  """
  executables = {} if executables is None else executables
  s = loop.setup(config, devices)
  mesh = s.mesh
  device = mesh.devices.flat[0]
  chip = topology.chip_of(device)
  state = s.sharded_abstract_state()
  local_batch = config.batch_size // mesh_lib.num_batch_shards(mesh)
  params_b = per_chip_bytes(s.abstract_state['params'], s.state_sharding['params'])
  opt_b = per_chip_bytes(s.abstract_state['opt'], s.state_sharding['opt'])
  state_b = per_chip_bytes(s.abstract_state, s.state_sharding)
  replicated = sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize
                   for x, sh in zip(jax.tree.leaves(s.abstract_state),
                                    jax.tree.leaves(s.state_sharding))
                   if sh.is_fully_replicated)
  batch_b = per_chip_bytes(s.batch_shapes, {k: v.sharding for k, v in s.batch_shapes.items()})
  out = dict(devices=mesh.size, device_kind=device.device_kind,
             mesh={k: int(v) for k, v in mesh.shape.items()},
             slices=len({getattr(d, 'slice_index', 0) for d in mesh.devices.flat}),
             batch=config.batch_size, local_batch=local_batch,
             memory=dict(params_bytes=params_b, opt_bytes=opt_b, batch_bytes=batch_b,
                         capacity_bytes=int(chip.hbm_bytes) if chip else None))
  try:
    compiled, secs = _compile(s.train_step, state, s.batch_shapes)
  except Exception as e:  # The compiler's refusal is the report, not a traceback.
    if not _OOM_RE.search(str(e)):
      raise
    out['fits'] = False
    out['memory'].update(oom_figures(str(e)))
    out['error'] = str(e).strip().splitlines()[0][:400]
    out['advice'] = _advice(config, state_b, replicated, local_batch)
    return out
  out['compile_sec'] = round(secs, 1)
  executables['train_step'] = compiled
  mem = memory(compiled)
  out['memory'].update(mem)
  cap = out['memory']['capacity_bytes']
  if cap:
    out['memory']['margin'] = round(1 - mem['peak_bytes'] / cap, 4)
  out['fits'] = cap is None or mem['peak_bytes'] <= cap
  if hlo_dir:
    _write_hlo(hlo_dir, 'train_step', compiled)

  try:
    colls = hlo.collectives(compiled)
  except ValueError as e:  # An HLO form the parser does not know: keep the rest.
    out['comm'] = dict(error=str(e)[:400])
    return out
  wire = sum(c.wire_bytes * c.executions for c in colls)
  minimum = analytic_min_wire_bytes(config, s)
  dcn = dcn_wire_bytes(config, s, minimum)
  local = _slice_mesh(mesh)
  out['collectives'] = [dict(kind=c.kind, axes=list(hlo.mesh_axes(c, local)), bytes=c.bytes,
                             executions=c.executions, wire_bytes=round(c.wire_bytes),
                             dtypes=sorted({dt for dt, _ in c.shapes}), op=c.op_name[-80:])
                        for c in colls]
  out['comm'] = dict(wire_bytes=round(wire), dcn_wire_bytes=round(dcn),
                     analytic_min_wire_bytes=minimum['total'] and round(minimum['total']),
                     analytic=minimum)
  # The TPU compiler lowers the reduce-scatter of each [B, D] embedding gradient (what JAX
  # emits for the gather's transpose) as an all-reduce plus a slice fused into its user:
  # twice the wire bytes of the minimum, the compiler's choice (tests/test_tpu_compile.py).
  b_x_d = (config.batch_size, config.model.get('embed_dim', 512))
  lowered = sum(c.wire_bytes / 2 * c.executions for c in colls
                if c.kind == 'all-reduce' and c.shapes == (('f32', b_x_d),))
  out['comm']['embedding_grad_all_reduce_excess_bytes'] = round(lowered)
  if minimum['total'] and out['slices'] == 1:  # A slice's program holds no DCN exchange.
    out['comm']['excess'] = round(wire / minimum['total'] - 1, 4)
    out['comm']['excess_unexplained'] = round((wire - lowered) / minimum['total'] - 1, 4)
    # E.g. a parameter sharded over a batch axis.
    if out['comm']['excess_unexplained'] > EXCESS_TOLERANCE:
      top = sorted(colls, key=lambda c: -c.wire_bytes * c.executions)[:3]
      out['comm']['problem'] = (
          f"{out['comm']['excess']:.1%} more wire bytes than the analytic minimum; largest: " +
          '; '.join(f'{c.kind} over {",".join(hlo.mesh_axes(c, local))} of '
                    f'{c.bytes:,} B x{c.executions} from {c.op_name[-60:] or c.name}'
                    for c in top))

  cost = _cost(compiled)
  f = config_flops.train_flops(config, local_batch=local_batch)
  # A frozen tower runs forward only: its 2x backward share is not model work.
  towers = {'img': 'image', 'txt': 'text'}
  frozen = frozen_towers(config, s.abstract_state['params'])
  model_flops = (f['train'] - sum(2 * f[towers[t]] for t in frozen)) * local_batch
  out['flops'] = dict(xla_per_chip=float(cost.get('flops', 0.0)),
                      model_per_chip=model_flops,
                      hbm_bytes_accessed=float(cost.get('bytes accessed', 0.0)))
  accum = config.get('accum_steps', 1)
  if accum > 1:
    out['flops']['note'] = (
        f'cost_analysis counts the body of the {accum} GradCache micro-batches once: the '
        'compute bound uses the model FLOPs, the HBM bound bytes accessed x accum_steps')
  if chip:
    out['bounds_ms'] = step_bounds(out['flops'], wire, dcn, chip, accum)
    out['bound'] = max(out['bounds_ms'], key=out['bounds_ms'].get)
    out['mfu_bound'] = round(
        model_flops / chip.peak_flops / (out['bounds_ms'][out['bound']] / 1e3), 4)
  if evals:
    out['evals'] = _eval_steps(config, s, hlo_dir, executables)
  return out


def step_bounds(flops: dict, wire: float, dcn: float, chip, accum: int = 1) -> dict:
  """Step-time lower bounds (ms) from the chip's peaks: compute, HBM, ICI and DCN.

  XLA's cost analysis counts a loop body once, so under GradCache (`accum` micro-batches in
  a loop) its FLOPs are about one micro-batch's: the compute bound then takes the model's
  FLOPs when larger, and the HBM bound scales bytes accessed by `accum` (an upper estimate,
  as bytes accessed already is)."""
  compute = flops['xla_per_chip'] if accum == 1 else max(flops['xla_per_chip'],
                                                          flops['model_per_chip'])
  bounds = dict(compute=compute / chip.peak_flops,
                hbm=flops['hbm_bytes_accessed'] * accum / chip.hbm_bw,
                ici=wire / chip.ici_bw, dcn=dcn / chip.dcn_bw)
  return {k: round(1e3 * v, 2) for k, v in bounds.items()}


def _eval_steps(config, s: loop.Setup, hlo_dir, executables: dict) -> dict:
  """Peak memory of the evaluators' image and text embedding steps at their batch size."""
  from mmcl import evaluate  # Evaluators import tf.data lazily; the Predictor does not.
  predictor = evaluate.Predictor(s.model, s.mesh)
  shards = mesh_lib.num_batch_shards(s.mesh)
  sizes = [cfg.get('batch_size', 1024) for cfg in config.evals.values()] or [1024]
  batch = -(-max(sizes) // shards) * shards
  params = s.sharded_abstract_state()['params']
  sharding = mesh_lib.batch_sharding(s.mesh)
  size = config.image_size
  inputs = {'embed_images': (predictor.image_fn, (batch, size, size, 3), np.float32),
            'embed_texts': (predictor.text_fn, (batch, config.text_len), np.int32)}
  out = {}
  for name, (fn, shape, dtype) in inputs.items():
    compiled, secs = _compile(fn, params, jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    executables[name] = compiled
    out[name] = dict(batch=batch, peak_bytes=memory(compiled)['peak_bytes'],
                     compile_sec=round(secs, 1))
    if hlo_dir:
      _write_hlo(hlo_dir, name, compiled)
  return out


def _write_hlo(directory: str, name: str, compiled):
  import os
  os.makedirs(directory, exist_ok=True)
  with open(os.path.join(directory, f'{name}.hlo.txt'), 'w') as f:
    f.write(compiled.as_text())
