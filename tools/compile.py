r"""Compiles a recipe for a TPU slice on a machine without TPUs, and says whether it fits.

  python tools/compile.py --config configs/clip_b16.py --topology v5e:16x16
  python tools/compile.py --config configs/siglip_so400m14.py --topology v5e:16x16 --slices 2
  python tools/compile.py --config configs/demo.py:tiny --topology v4:2x2x1 --hlo /tmp/hlo
  python tools/compile.py --config configs/clip_b16.py --topology v5e:16x16 --batch 16384 \
      --config.model.remat=full

Runs the real TPU compiler (libtpu, `pip install -e '.[test]'`) on the train step and the
evaluators' embedding steps of the config, built by the same `setup` as training over the
topology's devices, and prints a table (stderr) and one JSON line (stdout): per-chip HBM
(parameters, optimizer state, batch, temporaries, peak, capacity, margin), every logical
collective (kind, mesh axes, bytes, executions per step), wire bytes per chip beside the
analytic minimum, FLOPs per chip, step-time lower bounds from the chip's peaks and the MFU
they imply. A step that does not fit is reported with the figure the compiler asked for
and what would reduce it; the exit status is 1 then, or when the margin is under
`--min_margin`. `--hlo DIR` writes the optimized HLO. See BENCHMARKS.md section 5.
"""
import json
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/clip_b16.py.')
flags.DEFINE_string('topology', None, 'TPU slice, CHIP:AxB[xC], e.g. v5e:16x16, v4:4x4x8.')
flags.DEFINE_integer('slices', 1, 'Slices (multi-slice over DCN).')
flags.DEFINE_integer('batch', None, "Global batch (default: the config's batch_size).")
flags.DEFINE_bool('evals', True, "Also compile the evaluators' embedding steps.")
flags.DEFINE_string('hlo', None, 'Write the optimized HLO of each program into this folder.')
flags.DEFINE_float('min_margin', 0.10, 'Exit 1 when less than this share of HBM is left.')
flags.mark_flags_as_required(['config', 'topology'])

GiB = 2**30


def _gib(n) -> str:
  return '-' if n is None else f'{n / GiB:7.2f} GiB'


def format_report(r: dict) -> str:
  """The human-readable table of a compile_report.report() result."""
  m = r['memory']
  lines = [f"{r['devices']} x {r['device_kind']} ({r['slices']} slice(s)), mesh {r['mesh']}, "
           f"batch {r['batch']} ({r['local_batch']} per chip)"]
  rows = [('parameters', m['params_bytes']), ('optimizer state', m['opt_bytes']),
          ('batch', m['batch_bytes'])]
  if r['fits'] is False and 'peak_bytes' not in m:
    lines.append('DOES NOT FIT: ' + r['error'])
    rows += [('required (compiler)', m.get('required_bytes')),
             ('available (compiler)', m.get('available_bytes'))]
    lines += [f'  {k:<22}{_gib(v)}' for k, v in rows]
    lines.append('What would reduce it:')
    lines += [f'  - {tip}' for tip in r['advice']]
    return '\n'.join(lines)
  rows += [('temporaries', m['temp_bytes']), ('generated code', m['code_bytes']),
           ('peak', m['peak_bytes']), ('capacity', m['capacity_bytes'])]
  lines += [f'  {k:<22}{_gib(v)}' for k, v in rows]
  if m.get('margin') is not None:
    lines.append(f"  {'margin':<22}{m['margin']:7.1%}")
  if 'error' in r.get('comm', {}):
    lines.append(f"Collectives not read: {r['comm']['error']}")
    return '\n'.join(lines)
  lines.append(f"Logical collectives per step (compile {r['compile_sec']} s):")
  lines.append(f"  {'kind':<19}{'axes':<16}{'bytes':>14}{'x':>5}  dtypes  op")
  for c in r['collectives']:
    lines.append(f"  {c['kind']:<19}{','.join(c['axes']):<16}{c['bytes']:>14,}"
                 f"{c['executions']:>5}  {'/'.join(c['dtypes']):<7} {c['op'][-50:]}")
  comm = r['comm']
  minimum = comm['analytic_min_wire_bytes']
  lines.append(f"  wire bytes per chip {comm['wire_bytes']:,} (DCN {comm['dcn_wire_bytes']:,})"
               + (f"; analytic minimum {minimum:,} (excess {comm['excess']:+.1%})"
                  if minimum else '; analytic minimum: not counted for this config'))
  if comm.get('embedding_grad_all_reduce_excess_bytes'):
    lines.append(f"  of which {comm['embedding_grad_all_reduce_excess_bytes']:,} B: the [B, D] "
                 'embedding gradients reduce-scattered as all-reduces (the TPU compiler\'s '
                 f"lowering); excess without them {comm.get('excess_unexplained', 0):+.1%}")
  if comm.get('problem'):
    lines.append('  WARNING: ' + comm['problem'])
  f = r['flops']
  lines.append(f"FLOPs per chip: XLA {f['xla_per_chip']:.3e}, model {f['model_per_chip']:.3e}")
  if 'bounds_ms' in r:
    lines.append('Step-time lower bounds (ms): ' + ', '.join(
        f'{k} {v}' for k, v in r['bounds_ms'].items()) +
        f"; {r['bound']}-bound, MFU <= {r['mfu_bound']:.1%}")
  for name, e in r.get('evals', {}).items():
    lines.append(f"{name}: batch {e['batch']}, peak {_gib(e['peak_bytes'])}")
  return '\n'.join(lines)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  from mmcl.parallel import topology
  from mmcl.train import compile_report
  config = f.config
  if f.batch:
    config.batch_size = f.batch
  config.progress_bar = False
  devices = topology.devices(f.topology, f.slices)
  r = compile_report.report(config, devices, evals=f.evals, hlo_dir=f.hlo)
  r['topology'] = f.topology
  print(format_report(r), file=sys.stderr, flush=True)
  print(json.dumps(r), flush=True)
  margin = r['memory'].get('margin')
  if not r['fits'] or (margin is not None and margin < f.min_margin):
    sys.exit(1)


if __name__ == '__main__':
  app.run(main)
