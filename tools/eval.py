r"""Evaluates a checkpoint with the config's evaluators and prints a table.

  python tools/eval.py --config configs/demo.py --workdir /tmp/mmcl_demo        # latest
  python tools/eval.py --config configs/demo.py --checkpoint /tmp/mmcl_demo/ckpt/1300
  python tools/eval.py --config configs/demo.py --workdir W --evals=zeroshot,probe \
      --config.data_dir=/data/tfds   # a TFDS data_dir holding e.g. imagenet2012

Results also go to `<workdir>/eval/metrics.jsonl` (or --out_dir) and TensorBoard.
Several processes (each evaluates its share; process 0 writes and prints): start one per
host with --coordinator=HOST:PORT --num_processes=N --process_id=I (CPU and GPU clusters).
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py[:arg].',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Training workdir: evaluates its latest checkpoint.')
flags.DEFINE_string('checkpoint', None, 'A <workdir>/ckpt/<step> directory to evaluate.')
flags.DEFINE_list('evals', None, 'Names in config.evals to run (default: all).')
flags.DEFINE_string('out_dir', None, 'Where metrics go (default: <workdir>/eval).')
flags.DEFINE_string('coordinator', None, 'host:port of process 0, for several processes.')
flags.DEFINE_integer('num_processes', None, 'Number of processes (with --coordinator).')
flags.DEFINE_integer('process_id', None, 'This process (0 .. num_processes - 1).')
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # Keep tf.data off any accelerator: the model owns it.
  tf.config.set_visible_devices([], 'GPU')
  import jax
  f = flags.FLAGS
  if f.num_processes:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU collectives.
    jax.distributed.initialize(f.coordinator, num_processes=f.num_processes,
                               process_id=f.process_id)
  from mmcl.evaluate import checkpoint_eval
  try:
    checkpoint_eval.resolve_checkpoint(f.workdir, f.checkpoint)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  step, metrics = checkpoint_eval.evaluate_checkpoint(
      f.config, workdir=f.workdir, checkpoint=f.checkpoint, only=f.evals, out_dir=f.out_dir)
  if jax.process_index() == 0:
    print(checkpoint_eval.format_table(metrics, step), flush=True)


if __name__ == '__main__':
  from mmcl import hostmem
  hostmem.use_huge_pages()  # Re-executes once: see mmcl/hostmem.py.
  app.run(main)
