r"""Trains a config: `python tools/train.py --config configs/demo.py[:ARG] --workdir DIR`.

Any config value can be overridden: `--config.total_steps=100 --config.loss.name=sigmoid`.
Running the same command again resumes from the latest checkpoint in the workdir; SIGTERM
checkpoints the current step and exits 0.

Several processes (one per host): on TPU pods and other environments JAX detects, pass
`--multihost`; elsewhere give every process `--coordinator=HOST:PORT --num_processes=N
--process_id=I` (or MMCL_COORDINATOR / MMCL_NUM_PROCESSES / MMCL_PROCESS_ID). On CPUs the
processes talk through gloo.
"""
import os
import sys

# Before anything imports TensorFlow (loading the config may): keep its C++ logs quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Make `configs` and `mmcl` importable when run from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py[:arg].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
flags.DEFINE_bool('multihost', False, 'jax.distributed.initialize() from the environment '
                  '(TPU pods, SLURM, ...).')
flags.DEFINE_string('coordinator', os.environ.get('MMCL_COORDINATOR'),
                    'HOST:PORT of process 0, for multi-process runs.')
flags.DEFINE_integer('num_processes', int(os.environ.get('MMCL_NUM_PROCESSES', 1)),
                     'Number of processes.')
flags.DEFINE_integer('process_id', int(os.environ.get('MMCL_PROCESS_ID', 0)),
                     'This process, 0..num_processes-1.')
flags.mark_flags_as_required(['config', 'workdir'])


def init_distributed(f=flags.FLAGS):
  """Joins the multi-process run described by the flags (no-op for one process)."""
  import jax
  if f.multihost:
    jax.distributed.initialize()
  elif f.coordinator:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts only.
    jax.distributed.initialize(f.coordinator, num_processes=f.num_processes,
                               process_id=f.process_id)
  elif f.num_processes != 1:
    raise ValueError('--num_processes > 1 needs --coordinator=HOST:PORT (or --multihost).')


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every save at INFO.
  import tensorflow as tf  # Keep tf.data off any accelerator: the model owns it.
  tf.config.set_visible_devices([], 'GPU')
  init_distributed()
  from mmcl.train import loop
  loop.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  from mmcl import hostmem
  hostmem.use_huge_pages()  # Re-executes once: see mmcl/hostmem.py.
  app.run(main)
