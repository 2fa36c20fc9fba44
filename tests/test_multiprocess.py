"""Multi-process training: 2 processes x 4 host devices (gloo) == 1 process x 8 devices."""
import os
import socket
import subprocess
import sys

import numpy as np

from mmcl.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, data_dir, *extra):
  return [sys.executable, os.path.join(ROOT, 'tools', 'train.py'),
          f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}', '--config.total_steps=6',
          '--config.log_every=1', '--config.ckpt_every=3', '--config.progress_bar=False',
          '--config.input.shards=2', *extra]


def _env(devices):
  env = dict(os.environ)
  env['XLA_FLAGS'] = f'--xla_force_host_platform_device_count={devices}'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _losses(workdir):
  return {r['step']: r['train/loss'] for r in metrics_lib.read_metrics(workdir)
          if 'train/loss' in r}


def test_two_processes_match_one_process(shapes_data_dir, tmp_path):
  single = str(tmp_path / 'single')
  done = subprocess.run(_command(single, shapes_data_dir), env=_env(8), capture_output=True,
                        text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-3000:]

  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    port = s.getsockname()[1]
  multi = str(tmp_path / 'multi')
  procs = [subprocess.Popen(
      _command(multi, shapes_data_dir, f'--coordinator=127.0.0.1:{port}',
               '--num_processes=2', f'--process_id={i}'),
      env=_env(4), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
      for i in range(2)]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert 'zeroshot/mmcl_shapes/shape/top1' in outs[0][0]  # Only process 0 prints.
  assert 'zeroshot' not in outs[1][0]

  want, got = _losses(single), _losses(multi)
  assert sorted(got) == list(range(1, 7))
  np.testing.assert_allclose([got[s] for s in sorted(got)], [want[s] for s in sorted(got)],
                             rtol=1e-5)
  assert os.path.isdir(os.path.join(multi, 'ckpt', '6'))
  assert sorted(os.listdir(os.path.join(multi, 'data_state', '6'))) == ['shard_0', 'shard_1']
