"""tools/train.py as a user runs it: 8 host devices, config overrides, kill and resume."""
import os
import signal
import subprocess
import sys
import time

import pytest

from mmcl.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, data_dir, mesh, steps=30):
  return [sys.executable, os.path.join(ROOT, 'tools', 'train.py'),
          f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}',
          f'--config.total_steps={steps}', '--config.ckpt_every=10', '--config.log_every=1',
          f'--config.mesh={mesh}', '--config.progress_bar=False']


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _train_steps(workdir):
  return [r['step'] for r in metrics_lib.read_metrics(workdir) if 'train/loss' in r]


@pytest.mark.parametrize('mesh', ["(('data', 8),)", "(('data', 4), ('fsdp', 2))"])
def test_kill_and_rerun_resumes_without_repeating_steps(shapes_data_dir, tmp_path, mesh):
  workdir = str(tmp_path / 'w')
  cmd = _command(workdir, shapes_data_dir, mesh)
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  # Kill once a checkpoint exists and training has moved past it.
  while time.time() < deadline and proc.poll() is None:
    steps = _train_steps(workdir)
    if os.path.isdir(os.path.join(workdir, 'ckpt', '10')) and steps and steps[-1] >= 13:
      break
    time.sleep(0.2)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  killed_at = _train_steps(workdir)[-1]
  assert killed_at < 30

  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Resumed from step' in done.stdout + done.stderr
  assert _train_steps(workdir) == list(range(1, 31))  # Each step exactly once.
  assert 'zeroshot/mmcl_shapes/shape/top1' in done.stdout


def test_bad_override_is_a_clear_error(shapes_data_dir, tmp_path):
  cmd = _command(str(tmp_path), shapes_data_dir, "(('data', 8),)")
  cmd.append('--config.loss.name=hinge')
  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert "Unknown loss 'hinge'" in done.stderr and 'softmax' in done.stderr
