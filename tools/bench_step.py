r"""Train-step throughput of a config: one JSON line of measured and analytic figures.

  python tools/bench_step.py --config configs/bench_small.py --reference open_clip
  python tools/bench_step.py --config configs/demo.py --batch 256 --steps 5
  python tools/bench_step.py --config configs/demo.py:tiny --devices 8 --collectives
  python tools/bench_step.py --config configs/demo.py --patch_dropout 0,0.5,0.75   # FLIP
  python tools/bench_step.py --config configs/demo.py:naflex --naflex_budget 4,9,16  # NaFlex

Compiles the real train step of the config (mmcl.train.loop.setup) on the available devices
(or `--devices` forced host devices), feeds it one batch of random images and texts of the
right shapes, and prints:
  examples_per_sec    median over `--steps` timed steps after `--warmup` steps
  flops_per_example   from the compiled executable's cost analysis (all devices; it counts
                      a loop body once, so under `model.scan=True` it undercounts the layers)
  analytic_flops_per_example, flops_ratio   mmcl.models.flops' matmul count; XLA / analytic
  achieved_flops_per_sec   analytic FLOPs x examples/s
  matmul_flops_per_sec     a `--matmul`-sized fp32 square matmul on device 0, timed right
                      after each timed step (median)
  mfu                 median over steps of achieved / the matmul timed after it: against the
                      device's measured, not its nominal, peak, under the same load
  mfu_compiled        mfu by the compiled step's FLOPs (x flops_ratio): the training log's
                      train/mfu (mmcl/train/logger.py; compare with the same --matmul)
  peak_bytes_per_device    arguments + outputs + temporaries + code - donated aliases
                      (mmcl.train.compile_report.memory, as tools/compile.py reports it)
  donated_bytes_per_device what donating the state saves (the aliased state buffers)
  compile_sec, collectives (bytes per step by kind; mmcl.parallel.hlo)
  page_faults_per_step, kernel_cpu_sec_per_step   host page faults and kernel CPU time of a
                      step (median): what a fresh mapping of XLA's temporaries costs
  malloc_huge_pages   whether XLA's per-step buffers get huge pages (tools/hostmem.py; the
                      tool re-executes itself to turn them on unless MMCL_HUGE_PAGES=0)
`--steps 0` compiles only: no timing figures (e.g. compile time of a large config).
`--trace DIR` also traces two steps and prints where their time went: HLO op kind and the
model code (op_name) that made each op.
With `--reference open_clip` it also times open_clip's CLIP of configs/bench_small.py (an
AdamW step on a batch of the same shape) in the same process, when torch and open_clip are
installed (optional: see BENCHMARKS.md; tools/bench_open_clip.py), and adds
`reference_examples_per_sec` and `ratio`.
`--patch_dropout R1,R2,...` prints one line per FLIP patch-dropout ratio (the image tower's
`patch_dropout`, docs/resolution.md), each with its `patch_dropout` figure.
`--naflex_budget L1,L2,...` prints one line per NaFlex token budget (config.naflex.budget,
docs/resolution.md), each with its `naflex_budget` figure; the batch is NaFlex patches of
square images at the largest grid that fits (isqrt(L)^2 tokens, the rest padding), and the
analytic FLOPs count all L tokens (the padding runs through the encoder too). A config with
self-distillation is timed with its terms on (`Setup.train_step`: the heavier of the loop's
two programs); the analytic count includes them.
Analytic per-chip lower bounds of paper-scale steps on TPU slices: tools/roofline.py; what the
TPU compiler itself says: tools/compile.py.
"""
import json
import os
import resource
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from tools import bench_open_clip  # noqa: E402


def define_flags():
  """The flags of this tool (not defined on import: bench_input imports the functions)."""
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/bench_small.py.')
  flags.mark_flags_as_required(['config'])
  flags.DEFINE_integer('batch', None, 'Global batch (default: the config\'s batch_size).')
  flags.DEFINE_integer('steps', 10, 'Timed steps; 0: compile only (no timing figures).')
  flags.DEFINE_integer('warmup', 2, 'Untimed steps first.')
  flags.DEFINE_integer('devices', None, 'Forced host devices (CPU); default: what JAX sees.')
  flags.DEFINE_integer('matmul', 2048, 'Side of the square fp32 matmul that measures peak.')
  flags.DEFINE_enum('reference', None, ['open_clip'], 'Also time this reference model.')
  flags.DEFINE_bool('collectives', False, 'Also print the table of collectives (stderr).')
  flags.DEFINE_string('trace', None, 'After timing, trace 2 steps with jax.profiler into this '
                      'directory and print the ops that took the most time (stderr).')
  flags.DEFINE_list('patch_dropout', None, 'One row per image patch-dropout ratio (FLIP), '
                    'e.g. 0,0.5,0.75.')
  flags.DEFINE_list('naflex_budget', None, 'One row per NaFlex token budget '
                    '(config.naflex.budget), e.g. 4,9,16.')


def random_batch(config, batch: int, seed: int = 0) -> dict:
  """Images in [-1, 1] and texts of random length (token ids >= 1, then 0-padding)."""
  import numpy as np
  rng = np.random.default_rng(seed)
  size, length = config.image_size, config.text_len
  vocab = config.model.get('vocab_size') or config.model.text.vocab_size
  text = rng.integers(1, vocab, size=(batch, length), dtype=np.int32)
  lengths = rng.integers(length // 4, length + 1, size=(batch, 1))
  text = np.where(np.arange(length)[None] < lengths, text, 0).astype(np.int32)
  image = rng.uniform(-1, 1, size=(batch, size, size, 3)).astype(np.float32)
  out = {'image': image, 'text': text}
  from mmcl.train import naflex_input
  if naflex_input.budget(config):  # NaFlex patches of square images, padded to the budget.
    out.update(naflex_batch(config, batch, rng))
  dec = config.model.get('decoder')
  if dec:  # The captioning decoder's targets (mmcl/data/decoder_tasks.py), all scored.
    n = dec.get('max_len', 64)
    out['dec_tokens'] = rng.integers(1, dec['vocab_size'], size=(batch, n), dtype=np.int32)
    out['dec_loss_mask'] = np.ones((batch, n), np.int32)
  return out


def naflex_batch(config, batch: int, rng) -> dict:
  """Random NaFlex patches of square images: an isqrt(L) x isqrt(L) grid, then padding."""
  import math
  import numpy as np
  from mmcl.models import naflex
  from mmcl.train import naflex_input
  shapes = naflex_input.example_shapes(config)
  length, side = shapes['image'][0][0], math.isqrt(naflex_input.budget(config))
  index = np.arange(length)
  valid = index < side * side
  one = {naflex.ROWS: np.where(valid, index // side, -1), naflex.COLS: np.where(
      valid, index % side, -1), naflex.MASK: valid, naflex.GRID: np.array([side, side])}
  out = {k: np.broadcast_to(v, (batch, *v.shape)).astype(shapes[k][1]) for k, v in one.items()}
  patches = rng.uniform(-1, 1, size=(batch, *shapes['image'][0])).astype(np.float32)
  out['image'] = np.where(valid[None, :, None], patches, 0).astype(np.float32)
  return out


def bench_step(config, steps: int, warmup: int, matmul: int = 2048,
               trace_dir: str | None = None) -> dict:
  """Compiles and times `config`'s train step; the figures of the module docstring."""
  import jax
  import numpy as np
  from tools import hostmem
  from mmcl.train import config_flops
  from mmcl.parallel import hlo
  from mmcl.train import loop
  from mmcl.train import throughput

  batch = config.batch_size
  start = time.perf_counter()
  s = loop.setup(config)
  compiled = s.compile()
  compile_sec = time.perf_counter() - start

  devices = s.mesh.size
  xla_flops = throughput.step_flops(compiled) * devices / batch  # Per device: times all.
  analytic = config_flops.train_flops(config, global_batch=batch, local_batch=batch // devices)
  colls = hlo.collectives(compiled)
  row = dict(batch=batch, devices=devices, device_kind=jax.devices()[0].device_kind,
             malloc_huge_pages=hostmem.enabled(),
             flops_per_example=xla_flops, analytic_flops_per_example=analytic['train'],
             flops_ratio=round(xla_flops / analytic['train'], 4),
             **_memory(compiled), compile_sec=round(compile_sec, 2),
             collectives={k: v['bytes'] for k, v in hlo.summary(colls).items()},
             _colls=colls)
  if steps == 0:
    return row

  state = s.init_state(jax.random.key(config.seed))
  data = random_batch(config, batch)
  extra = np.random.default_rng(1)
  for k, v in s.batch_shapes.items():  # Other keys (e.g. self-distillation's views): noise.
    if k not in data:
      data[k] = extra.uniform(-1, 1, size=v.shape).astype(v.dtype)
  data = jax.device_put(data, {k: v.sharding for k, v in s.batch_shapes.items()})
  holder = [state]

  def one_step():
    holder[0], metrics = compiled(holder[0], data)
    jax.block_until_ready((holder[0], metrics))

  # Each timed step is followed by one timed matmul, so that MFU compares the two under the
  # same load (the machine may be shared); the medians are reported.
  matmul_rate = throughput.matmul_timer(matmul)
  for _ in range(warmup):
    one_step()
  secs, rates, host = [], [], []
  for _ in range(steps):
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.perf_counter()
    one_step()
    secs.append(time.perf_counter() - start)
    after = resource.getrusage(resource.RUSAGE_SELF)
    host.append((after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime))
    rates.append(matmul_rate())
  if trace_dir:
    trace_ops(one_step, compiled, trace_dir)
  sec, rate = statistics.median(secs), statistics.median(rates)
  # Forced host devices share the CPU's cores, which one device's matmul already uses.
  per_peak = 1 if jax.devices()[0].platform == 'cpu' else devices
  achieved = analytic['train'] * batch / sec
  mfu = statistics.median(analytic['train'] * batch / t / (r * per_peak)
                          for t, r in zip(secs, rates))
  return dict(examples_per_sec=round(batch / sec, 2), step_sec=round(sec, 4),
              achieved_flops_per_sec=achieved, matmul_flops_per_sec=rate, mfu=round(mfu, 4),
              mfu_compiled=round(mfu * row['flops_ratio'], 4),
              page_faults_per_step=int(statistics.median(h[0] for h in host)),
              kernel_cpu_sec_per_step=round(statistics.median(h[1] for h in host), 3),
              **row)


def _memory(compiled) -> dict:
  """compile_report.memory's figures under this tool's names (per device); donated: the old
  state's buffers reused for the new one (without donation the peak would be that higher)."""
  from mmcl.train import compile_report
  m = compile_report.memory(compiled)
  return {'peak_bytes_per_device': m['peak_bytes'], 'temp_bytes_per_device': m['temp_bytes'],
          'donated_bytes_per_device': m['alias_bytes']}


def trace_ops(one_step, compiled, trace_dir: str, steps: int = 2, top: int = 25):
  """Traces `steps` steps into `trace_dir` (TensorBoard / Perfetto) and prints (stderr) the
  ops that took the most thread time per step, with their share (mmcl.train.profile)."""
  from mmcl.train import profile

  def run_steps():
    for _ in range(steps):
      one_step()
  profile.trace(run_steps, trace_dir)
  profile.print_op_summary(trace_dir, compiled, steps, top)


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  if f.reference == 'open_clip':
    bench_open_clip.import_torch_first()
  if f.devices:  # Before the first jax import.
    os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                               f' --xla_force_host_platform_device_count={f.devices}')
  config = f.config
  if f.batch:
    config.batch_size = f.batch
  config.progress_bar = False
  if f.patch_dropout and f.naflex_budget:
    raise app.UsageError('--patch_dropout and --naflex_budget do not combine (NaFlex refuses '
                         'patch dropout).')
  for ratio in f.patch_dropout or [None]:
    for length in f.naflex_budget or [None]:
      if ratio is not None:
        with config.unlocked():  # TwoTowers keeps it in the image tower, LIMoE at the top.
          tower = config.model if config.model.name == 'limoe' else config.model.image
          tower.patch_dropout = float(ratio)
      if length is not None:  # The bench draws its own grids: no per-example budgets.
        config.naflex.budget, config.naflex.draw = int(length), ()
      row = bench_step(config, f.steps, f.warmup, f.matmul, f.trace)
      if ratio is not None:
        row = {'patch_dropout': float(ratio), **row}
      if length is not None:
        row = {'naflex_budget': int(length), **row}
      _print_row(f, config, row)


def _print_row(f, config, row):
  colls = row.pop('_colls')
  if f.collectives:
    from mmcl.parallel import hlo
    print(hlo.format_table(colls), file=sys.stderr)
  if f.reference == 'open_clip' and f.steps:
    ref = bench_open_clip.open_clip_step(config.batch_size, f.steps, f.warmup)
    if ref is None:
      row['reference'] = 'open_clip not installed (pip install torch open_clip_torch)'
    else:
      row.update(ref)
      row['ratio'] = round(row['examples_per_sec'] / ref['reference_examples_per_sec'], 3)
  print(json.dumps(row), flush=True)


if __name__ == '__main__':
  from tools import hostmem
  hostmem.use_huge_pages()  # Re-executes once: see tools/hostmem.py.
  define_flags()
  app.run(main)
