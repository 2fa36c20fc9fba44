r"""Evaluates a checkpoint with the config's evaluators and prints a table.

  python tools/eval.py --config configs/demo.py --workdir /tmp/mmcl_demo        # latest
  python tools/eval.py --config configs/demo.py --checkpoint /tmp/mmcl_demo/ckpt/1300
  python tools/eval.py --config configs/demo.py --workdir W --evals=zeroshot,probe \
      --config.data_dir=/data/tfds   # a TFDS data_dir holding e.g. imagenet2012

  python tools/eval.py --config configs/demo.py --workdir W --steps=all    # every checkpoint
  python tools/eval.py --config C --workdir W --evals=suite --config.data_dir=/data/tfds
      # the zero-shot suite (configs/evals.py zeroshot_suite) and its mean

Results also go to `<workdir>/eval/metrics.jsonl` (or --out_dir) and TensorBoard; with
several steps a metric x step table is printed and `<out_dir>/evals.png` drawn.
Several processes (each evaluates its share; process 0 writes and prints) take the training
tool's flags: `--multihost` on TPU pods, else --coordinator=HOST:PORT --num_processes=N
--process_id=I on every host (mmcl/parallel/processes.py).
"""
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmcl.parallel import processes  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py[:arg].',
                                lock_config=False)
flags.DEFINE_string('workdir', None, 'Training workdir: evaluates its latest checkpoint.')
flags.DEFINE_string('checkpoint', None, 'A <workdir>/ckpt/<step> directory to evaluate.')
flags.DEFINE_list('evals', None, 'Names in config.evals to run (default: all), or suites of '
                  "configs/evals.py NAMED_SUITES: 'suite' (zero-shot), 'imagenet', 'retrieval'.")
flags.DEFINE_string('out_dir', None, 'Where metrics go (default: <workdir>/eval).')
flags.DEFINE_list('steps', None, "With --workdir: 'all', or steps to evaluate (default: the "
                  'latest).')
processes.define_flags()
flags.mark_flags_as_required(['config'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)
  import tensorflow as tf  # Keep tf.data off any accelerator: the model owns it.
  tf.config.set_visible_devices([], 'GPU')
  import jax
  f = flags.FLAGS
  processes.init_distributed()
  from mmcl import fs
  from mmcl.train import checkpoint_eval
  try:
    workdir, step = checkpoint_eval.resolve_checkpoint(f.workdir, f.checkpoint)
    steps = _steps(f.steps, step)
  except ValueError as e:
    raise app.UsageError(str(e)) from e
  from configs import evals as evals_lib  # --evals=suite etc. add configs/evals.py suites.
  config, only = evals_lib.with_named_suites(f.config, f.evals)
  results = checkpoint_eval.evaluate_steps(config, workdir, steps, only=only,
                                           out_dir=f.out_dir)
  if jax.process_index() != 0:
    return
  if len(results) == 1:
    (step, metrics), = results.items()
    print(checkpoint_eval.format_table(metrics, step), flush=True)
    return
  print(checkpoint_eval.format_steps_table(results), flush=True)
  out_dir = f.out_dir or fs.join(workdir, 'eval')
  if '://' not in out_dir:  # matplotlib writes local files only.
    plot = checkpoint_eval.plot_steps(results, fs.join(out_dir, 'evals.png'))
    if plot:
      print(f'Plot: {plot}', flush=True)


def _steps(flag: list[str] | None, step: int | None):
  """None (latest), 'all' or [int] from --steps, given --checkpoint's step (or None)."""
  if not flag:
    return None if step is None else [step]
  if step is not None:
    raise ValueError('--steps goes with --workdir; --checkpoint names its one step.')
  if flag == ['all']:
    return 'all'
  if not all(s.isdigit() for s in flag):
    raise ValueError(f"--steps={','.join(flag)}: give 'all' or step numbers, e.g. "
                     '--steps=1000,2000.')
  return [int(s) for s in flag]


if __name__ == '__main__':
  app.run(main)
