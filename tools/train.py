r"""Trains a config: `python tools/train.py --config configs/demo.py[:ARG] --workdir DIR`.

Any config value can be overridden: `--config.total_steps=100 --config.loss.name=sigmoid`.
Running the same command again resumes from the latest checkpoint in the workdir; SIGTERM
checkpoints the current step and exits 0.

Several processes (one per host): `--multihost` on TPU pods, else `--coordinator=HOST:PORT
--num_processes=N --process_id=I` (mmcl/parallel/processes.py).
"""
import os
import sys

# Before anything imports TensorFlow (loading the config may): keep its C++ logs quiet.
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
# Make `configs` and `mmcl` importable when run from a checkout.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from absl import app, flags, logging  # noqa: E402
from ml_collections import config_flags  # noqa: E402

from mmcl.parallel import processes  # noqa: E402

config_flags.DEFINE_config_file('config', None, 'Config file, e.g. configs/demo.py[:arg].',
                                lock_config=True)
flags.DEFINE_string('workdir', None, 'Where checkpoints and metrics go.')
processes.define_flags()
flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  del argv
  logging.set_verbosity(logging.WARNING)  # Orbax and JAX log every save at INFO.
  import tensorflow as tf  # Keep tf.data off any accelerator: the model owns it.
  tf.config.set_visible_devices([], 'GPU')
  processes.init_distributed()
  from mmcl.train import loop
  loop.run(flags.FLAGS.config, flags.FLAGS.workdir)


if __name__ == '__main__':
  from tools import hostmem
  hostmem.use_huge_pages()  # Re-executes once: see tools/hostmem.py.
  app.run(main)
