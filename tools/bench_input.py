r"""Input-pipeline throughput of a config, next to its train step's consumption: one JSON line.

  python tools/bench_input.py --config configs/demo.py
  python tools/bench_input.py --config configs/bench_small.py --batches 50 --nostep

Times this host's tf.data pipeline alone (mmcl.train.loop.train_dataset, the stream the
training loop reads: the config's dataset and pp string; read, decode, augment, tokenize,
batch, drop records of the wrong shape), as numpy batches
with nothing consuming them: `input_examples_per_sec`, the median over `--batches` batches
after `--warmup` (the shuffle buffer fills during the warm-up). Then, unless `--nostep`,
the train step's consumption on this host's devices (tools/bench_step.py's measurement):
`step_examples_per_sec`, and `headroom` = input / step (>= 1: the input keeps up).
With `--data_state N`: the training loop's stream after N batches, saved as a checkpoint
saves it: `data_state_bytes`, and the seconds the step waits for the snapshot and the
seconds until the writer thread is done (BENCHMARKS.md section 8).
"""
import json
import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402


def define_flags():
  """The flags of this tool (not defined on import: tests import its functions)."""
  config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py.')
  flags.DEFINE_integer('batch', None, 'Global batch (default: the config\'s batch_size).')
  flags.DEFINE_integer('batches', 30, 'Timed batches.')
  flags.DEFINE_integer('warmup', 5, 'Untimed batches first.')
  flags.DEFINE_bool('step', True, 'Also time the train step (bench_step) for comparison.')
  flags.DEFINE_integer('steps', 5, 'Timed train steps.')
  flags.DEFINE_integer('data_state', 0, 'Also save the data state after this many batches.')
  flags.mark_flags_as_required(['config'])


def input_examples_per_sec(config, batches: int, warmup: int) -> dict:
  """This host's pipeline rate: the median over `batches` per-batch times."""
  import jax
  from mmcl.train import loop
  # The training loop's own stream (with one data shard per process).
  ds = loop.train_dataset(config, config.seed, jax.process_index(), jax.process_count())
  it = ds.as_numpy_iterator()
  local = config.batch_size // jax.process_count()
  for _ in range(warmup):
    next(it)
  times = []
  for _ in range(batches):
    start = time.perf_counter()
    next(it)
    times.append(time.perf_counter() - start)
  sec = statistics.median(times)
  return {'input_examples_per_sec': round(local / sec, 1),
          'input_mean_examples_per_sec': round(local * len(times) / sum(times), 1),
          'local_batch': local}


def data_state_size(config, batches: int, directory: str) -> dict:
  """The data state of the loop's stream (loop.make_batches) after `batches` batches."""
  from mmcl import fs
  from mmcl.parallel import mesh as mesh_lib
  from mmcl.train import loop
  stream = loop.make_batches(config, mesh_lib.create_mesh(config.mesh), config.seed)
  for _ in range(batches):
    next(stream)
  start = time.perf_counter()
  stream.save_async(directory)
  snapshot = time.perf_counter() - start
  stream.wait()
  written = time.perf_counter() - start
  size = sum(fs.path(fs.join(directory, n, 'state')).stat().length
             for n in fs.listdir(directory))  # One shard_<i>/state per data shard.
  return {'data_state_bytes': size, 'data_state_snapshot_s': round(snapshot, 3),
          'data_state_written_s': round(written, 3), 'data_state_after_batches': batches}


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  f = flags.FLAGS
  config = f.config
  if f.batch:
    config.batch_size = f.batch
  config.progress_bar = False
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')  # tf.data only; the accelerator is JAX's.
  row = {'config': f['config'].config_filename, 'dataset': config.input.name,
         **input_examples_per_sec(config, f.batches, f.warmup)}
  if f.step:
    from tools import bench_step  # Its flags are defined only when run as a script.
    step = bench_step.bench_step(config, f.steps, warmup=1)
    # Per host: this process's share of the global batch, as fast as the step takes it.
    import jax
    row['step_examples_per_sec'] = round(step['examples_per_sec'] / jax.process_count(), 2)
    row['headroom'] = round(row['input_examples_per_sec'] / row['step_examples_per_sec'], 2)
  if f.data_state:
    import tempfile
    with tempfile.TemporaryDirectory() as directory:
      row.update(data_state_size(config, f.data_state, directory))
  print(json.dumps(row), flush=True)


if __name__ == '__main__':
  from tools import hostmem
  hostmem.use_huge_pages()  # Re-executes once: see tools/hostmem.py.
  define_flags()
  app.run(main)
