"""tools/train.py as a user runs it: 8 host devices, config overrides, kill and resume."""
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from mmcl.train import metrics as metrics_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, data_dir, mesh, steps=12):
  return [sys.executable, os.path.join(ROOT, 'tools', 'train.py'),
          f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny',
          f'--workdir={workdir}', f'--config.data_dir={data_dir}',
          f'--config.total_steps={steps}', '--config.ckpt_every=4', '--config.log_every=1',
          f'--config.mesh={mesh}', '--config.progress_bar=False']


def _env():
  env = dict(os.environ)
  env['XLA_FLAGS'] = '--xla_force_host_platform_device_count=8'
  env['JAX_PLATFORMS'] = 'cpu'
  return env


def _train_steps(workdir):
  return [r['step'] for r in metrics_lib.read_metrics(workdir) if 'train/loss' in r]


def _final_params(workdir, step):
  import orbax.checkpoint as ocp
  state = ocp.StandardCheckpointer().restore(os.path.join(workdir, 'ckpt', str(step), 'default'))
  return state['params']


def test_sigkill_at_a_random_step_then_resume_gives_the_same_parameters(
    shapes_data_dir, tmp_path):
  """Exact resume: killed (-9) after a random step, rerun, same final params as no kill."""
  import jax
  import numpy as np
  mesh = "(('data', 4), ('fsdp', 2))"
  reference = str(tmp_path / 'uninterrupted')
  assert subprocess.run(_command(reference, shapes_data_dir, mesh), env=_env(),
                        capture_output=True, timeout=300).returncode == 0

  workdir = str(tmp_path / 'w')
  cmd = _command(workdir, shapes_data_dir, mesh)
  kill_after = random.Random().randint(5, 10)  # Past the step-4 checkpoint.
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = _train_steps(workdir)
    if os.path.isdir(os.path.join(workdir, 'ckpt', '4')) and steps and steps[-1] >= kill_after:
      break
    time.sleep(0.05)
  assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  assert _train_steps(workdir)[-1] < 12

  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'Resumed from step' in done.stdout + done.stderr
  assert _train_steps(workdir) == list(range(1, 13))  # Each step exactly once.
  assert 'zeroshot/mmcl_shapes/shape/top1' in done.stdout
  got, want = _final_params(workdir, 12), _final_params(reference, 12)
  for path, g in jax.tree_util.tree_leaves_with_path(got):
    w = jax.tree_util.tree_leaves_with_path(want)
    np.testing.assert_allclose(
        g, dict(w)[path], rtol=1e-5, atol=1e-7, err_msg=jax.tree_util.keystr(path))


def test_sigterm_checkpoints_the_step_exits_zero_and_resumes(shapes_data_dir, tmp_path):
  workdir = str(tmp_path / 'w')
  cmd = _command(workdir, shapes_data_dir, "(('data', 8),)", steps=500)
  proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True)
  deadline = time.time() + 300
  while time.time() < deadline and proc.poll() is None:
    steps = _train_steps(workdir)
    if steps and steps[-1] >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 0, err[-3000:]
  stopped = int(out.split('checkpoint of step ')[1].split(' ')[0])
  assert 3 <= stopped < 500
  assert os.path.isdir(os.path.join(workdir, 'ckpt', str(stopped)))
  assert _train_steps(workdir) == list(range(1, stopped + 1))

  cmd = _command(workdir, shapes_data_dir, "(('data', 8),)", steps=stopped + 3)
  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert f'Resumed from step {stopped}' in done.stdout
  assert _train_steps(workdir) == list(range(1, stopped + 4))


def test_bad_override_is_a_clear_error(shapes_data_dir, tmp_path):
  cmd = _command(str(tmp_path), shapes_data_dir, "(('data', 8),)")
  cmd.append('--config.loss.name=hinge')
  done = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
  assert done.returncode != 0
  assert "Unknown loss 'hinge'" in done.stderr and 'softmax' in done.stderr
