"""How fast a step runs against what the devices could do: FLOPs, peaks, MFU and memory.

- `step_flops(compiled)`: FLOPs of one step on one device, from the compiled step's own
  `cost_analysis()` (what XLA runs: a few percent over mmcl.models.flops' matmul count).
- `device_peak(devices)`: per-device peak FLOP/s and where it comes from: the chip table
  (mmcl.parallel.topology.CHIPS) on TPU, `GPU_PEAKS` on GPU, and on CPU a measured fp32
  matmul (`matmul_timer`), the rate tools/bench_step.py divides by too. Forced host devices
  share the CPU's cores, which one device's matmul already uses: each gets 1/n of the rate.
- `memory_stats(devices)`: bytes in use and peak, the largest over the local devices, from
  `device.memory_stats()`; None where the backend has none (the CPU).
"""
import time

import jax

from mmcl.parallel import topology

# Dense bf16 tensor-core peaks (FLOP/s) of NVIDIA data-centre GPUs by device_kind substring,
# from NVIDIA's datasheets (A100: 312 TFLOP/s; H100/H200 SXM: 989 TFLOP/s; B200: 2.25
# PFLOP/s); read 2026-12-02. The first match wins: longer names first.
GPU_PEAKS = (('H200', 989e12), ('H100', 989e12), ('B200', 2250e12), ('A100', 312e12))


def matmul_timer(n: int):
  """A function that times an n x n @ n x n float32 matmul on the default device (FLOP/s);
  compiled and warmed up here, so each call costs three matmuls."""
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  f = jax.jit(lambda a, b: a @ b)
  for _ in range(2):
    f(a, a).block_until_ready()

  def rate():  # The best of 3: the first call after a long step runs cold (~0.6x).
    secs = []
    for _ in range(3):
      start = time.perf_counter()
      f(a, a).block_until_ready()
      secs.append(time.perf_counter() - start)
    return 2 * n**3 / min(secs)
  return rate


def step_flops(compiled) -> float:
  """FLOPs of one call of `compiled` on one device (cost_analysis is per device)."""
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  return float(cost.get('flops', 0.0))


def device_peak(devices, matmul: int = 1024) -> tuple[float, str]:
  """(peak FLOP/s of one of `devices`, where the figure comes from)."""
  d = devices[0]
  chip = topology.chip_of(d)
  if chip is not None:
    return chip.peak_flops, f'{chip.name} bf16 peak ({chip.source})'
  if d.platform == 'gpu':
    for name, peak in GPU_PEAKS:
      if name.lower() in d.device_kind.lower():
        return peak, f'{name} bf16 dense peak (NVIDIA datasheet)'
  # CPU (or an unknown accelerator): measured, once; ~0.1 s for n=1024 on 2 cores.
  rate = matmul_timer(matmul)()
  shared = len(devices) if d.platform == 'cpu' else 1
  return rate / shared, (f'measured {matmul}x{matmul} fp32 matmul on {d.device_kind}'
                         f'{f", shared by {shared} host devices" if shared > 1 else ""}')


def memory_stats(devices) -> dict | None:
  """{'bytes_in_use', 'peak_bytes_in_use'} (the largest over `devices`), or None."""
  stats = [d.memory_stats() for d in devices]
  stats = [s for s in stats if s and 'bytes_in_use' in s]
  if not stats:
    return None
  return {'bytes_in_use': max(s['bytes_in_use'] for s in stats),
          'peak_bytes_in_use': max(s.get('peak_bytes_in_use', s['bytes_in_use'])
                                   for s in stats)}
