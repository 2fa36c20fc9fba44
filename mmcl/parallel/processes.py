"""The multi-process flags of tools/train.py and tools/eval.py, and joining the run.

On TPU pods (and SLURM, GKE, ...) JAX finds the other processes itself: `--multihost`.
Elsewhere every process is told `--coordinator=HOST:PORT --num_processes=N --process_id=I`
(or MMCL_COORDINATOR / MMCL_NUM_PROCESSES / MMCL_PROCESS_ID); CPU hosts talk through gloo.
Importing this module does not import JAX, so a tool can hide accelerators from TF first.
"""
import os

from absl import flags


def define_flags():
  flags.DEFINE_bool('multihost', False, 'jax.distributed.initialize() from the environment '
                    '(TPU pods, SLURM, ...).')
  flags.DEFINE_string('coordinator', os.environ.get('MMCL_COORDINATOR'),
                      'HOST:PORT of process 0, for multi-process runs.')
  flags.DEFINE_integer('num_processes', int(os.environ.get('MMCL_NUM_PROCESSES', 1)),
                       'Number of processes.')
  flags.DEFINE_integer('process_id', int(os.environ.get('MMCL_PROCESS_ID', 0)),
                       'This process, 0..num_processes-1.')


def init_distributed(f=flags.FLAGS):
  """Joins the multi-process run the flags describe (no-op for one process)."""
  import jax
  if f.multihost:
    jax.distributed.initialize()
  elif f.coordinator:
    jax.config.update('jax_cpu_collectives_implementation', 'gloo')  # CPU hosts only.
    jax.distributed.initialize(f.coordinator, num_processes=f.num_processes,
                               process_id=f.process_id)
  elif f.num_processes != 1:
    raise ValueError('--num_processes > 1 needs --coordinator=HOST:PORT (or --multihost).')
