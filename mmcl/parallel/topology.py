"""TPU slices without TPUs: a topology's devices (for ahead-of-time compiles) and chip peaks.

`devices('v5e:16x16', slices=2)` returns the devices of two v5e-256 slices as libtpu
describes them; `setup(config, devices)` builds its mesh over them and `jax.jit(...).lower(
...).compile()` runs the real TPU compiler (memory assignment, collectives, fusions) on a
machine with no TPU. Needs `libtpu` (the version jax[tpu] pins; part of the test extra).

CHIPS holds each chip's published peaks, one row per chip, with its source. Figures are
per chip: bf16 peak FLOP/s, HBM bytes and bytes/s, `ici_bw` the per-chip share of the pod's
all-reduce bandwidth (what a ring collective over the slice sees), `dcn_bw` the per-chip
share of the data-centre network between slices.
"""
import dataclasses
import functools
import os
import re

GB, GiB = 1e9, 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
  name: str
  peak_flops: float  # bf16 FLOP/s.
  hbm_bytes: float
  hbm_bw: float  # Bytes/s.
  ici_bw: float  # Bytes/s per chip for ring collectives within a slice.
  dcn_bw: float  # Bytes/s per chip between slices.
  chip_config: str  # libtpu's chip_config_name: one JAX device per chip.
  source: str


# Cloud TPU system architecture pages (cloud.google.com/tpu/docs/{v4,v5e,v5p,v6e}), read
# 2026-12-01. ici_bw: "all-reduce bandwidth per pod" / chips per pod where the page gives it
# (v4 1.1 PB/s / 4096, v5e 51.2 TB/s / 256, v6e 102.4 TB/s / 256); v5p gives only the
# per-chip ICI link rate (4800 Gbps), halved as v5e's 400 GBps link rate is to its 200 GB/s
# share. dcn_bw: v5e's "data center network bandwidth per pod" 6.4 Tbps / 256 chips, used
# for every chip (the other pages give none).
_DCN = 6.4e12 / 8 / 256
CHIPS = {
    'v4': Chip('v4', 275e12, 32 * GiB, 1200 * GB, 1.1e15 / 4096, _DCN, 'megacore',
               'cloud.google.com/tpu/docs/v4'),
    'v5e': Chip('v5e', 197e12, 16 * GiB, 819 * GB, 51.2e12 / 256, _DCN, 'default',
                'cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip('v5p', 459e12, 95 * GiB, 2765 * GB, 4800e9 / 8 / 2, _DCN, 'megacore',
                'cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip('v6e', 918e12, 32 * GiB, 1638 * GB, 102.4e12 / 256, _DCN, 'default',
                'cloud.google.com/tpu/docs/v6e'),
}
_NAME_RE = re.compile(r'^(v4|v5e|v5p|v6e):(\d+(?:x\d+){1,2})$')


def parse(topology: str) -> tuple[Chip, tuple[int, ...]]:
  """('v5e:16x16') -> (the chip, the slice's chip grid)."""
  m = _NAME_RE.match(topology)
  if not m:
    raise ValueError(f'Unknown TPU topology {topology!r}: give CHIP:AxB[xC] with CHIP one of '
                     f'{sorted(CHIPS)}, e.g. v5e:16x16, v4:4x4x8, v5p:4x4x4, v6e:8x8.')
  return CHIPS[m.group(1)], tuple(int(n) for n in m.group(2).split('x'))


def chip_of(device) -> Chip | None:
  """The CHIPS row of a JAX TPU device (by its device_kind), or None for other devices."""
  kind = device.device_kind.lower()
  for pattern, name in (('v4', 'v4'), ('v5 lite', 'v5e'), ('v5e', 'v5e'), ('v5p', 'v5p'),
                        ('v5', 'v5p'), ('v6 lite', 'v6e'), ('v6e', 'v6e')):
    if device.platform == 'tpu' and pattern in kind:
      return CHIPS[name]
  return None


def _quiet_libtpu():
  # libtpu looks for a TPU VM's metadata server and worker list at start; off a TPU VM it
  # logs errors (compiling works regardless). It also takes a machine-wide lock file, which
  # would refuse a second compiling process (a test's subprocess, two compiles at once).
  # Must run before libtpu loads.
  os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
  os.environ.setdefault('TPU_SKIP_MDS_QUERY', '1')
  os.environ.setdefault('TPU_ACCELERATOR_TYPE', 'v5litepod-16')
  os.environ.setdefault('TPU_WORKER_HOSTNAMES', 'localhost')


@functools.lru_cache(maxsize=None)
def devices(topology: str, slices: int = 1) -> tuple:
  """The devices of `slices` TPU slices of `topology` (one per chip), from libtpu."""
  chip, grid = parse(topology)
  if slices < 1:
    raise ValueError(f'slices={slices} must be >= 1.')
  _quiet_libtpu()
  from jax.experimental import topologies
  try:
    desc = topologies.get_topology_desc(
        platform='tpu', topology_name=topology, chip_config_name=chip.chip_config,
        chips_per_host_bounds=(2, 2, 1), num_slices=slices)
  except Exception as e:  # libtpu missing, or a grid the chip does not come in.
    raise ValueError(f'Cannot describe TPU topology {topology!r} x {slices} slice(s): {e}. '
                     "Is libtpu installed (pip install -e '.[test]')?") from e
  return tuple(desc.devices)
