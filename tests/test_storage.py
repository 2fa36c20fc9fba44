"""Storage: a gs:// workdir (on the test's own fake filesystem), torn metrics lines, and the
workdir lock that keeps a second run out."""
import json
import os
import re
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

import fake_gcs
from configs import demo
from mmcl import fs, tree
from mmcl.convert import io
from mmcl.train import checkpoint_eval
from mmcl.train import loop
from mmcl.train import metrics as metrics_lib
from mmcl.train import validate as validate_lib
from mmcl.train import workdir_lock


@pytest.fixture
def gcs(tmp_path, monkeypatch):
  """gs:// on `tmp_path/gcs`, run from an empty current directory `tmp_path/cwd`."""
  root, cwd = tmp_path / 'gcs', tmp_path / 'cwd'
  root.mkdir()
  cwd.mkdir()
  monkeypatch.chdir(cwd)
  fake_gcs.install(monkeypatch, str(root))
  return root, cwd


def files_under(root):
  return sorted(os.path.relpath(os.path.join(d, f), root)
                for d, _, names in os.walk(root) for f in names)


def test_a_gs_workdir_keeps_every_file_there_and_resumes(shapes_data_dir, gcs, monkeypatch,
                                                         capsys):
  root, cwd = gcs
  c = demo.get_config('tiny')
  c.data_dir, c.progress_bar, c.evals = shapes_data_dir, False, {}
  c.total_steps, c.ckpt_every, c.log_every = 2, 1, 1
  s = loop.setup(c)  # One setup for both runs: the train step compiles once.
  monkeypatch.setattr(loop, 'setup', lambda *args, **kwargs: s)
  workdir = 'gs://bucket/run'
  loop.run(c, workdir)
  c.total_steps = 3
  loop.run(c, workdir)
  assert 'Resumed from step 2 in gs://bucket/run/ckpt' in capsys.readouterr().out
  assert os.listdir(cwd) == []  # Was: $PWD/gs:/bucket/run/ckpt, lost with the VM.
  files = files_under(root / 'bucket' / 'run')
  assert {f.split('/')[0] for f in files} == {'ckpt', 'data_state', 'metrics.jsonl',
                                              'run_info.json', 'tb'}
  assert {f.split('/')[1] for f in files if f.startswith('ckpt/')} == {'1', '2', '3'}
  assert {f.split('/')[1] for f in files if f.startswith('data_state/')} == {'1', '2', '3'}
  assert any(f.startswith('tb/events.out.tfevents') for f in files), files
  rows = metrics_lib.read_metrics(workdir)
  assert [r['step'] for r in rows if 'train/loss' in r] == [1, 2, 3]
  # Reading from gs:// too: eval output, and the checkpoint as model_init weights.
  c.evals = demo.get_config('tiny').evals
  c.evals = {'retrieval': c.evals.retrieval}
  step, metrics = checkpoint_eval.evaluate_checkpoint(c, checkpoint=workdir + '/ckpt/3')
  assert step == 3 and 'retrieval/mmcl_shapes/i2t_r1' in metrics
  assert metrics_lib.read_metrics(workdir + '/eval')[0]['step'] == 3
  params = io.load_params(workdir + '/ckpt/3')
  assert params['img']['head']['kernel'].shape == s.abstract_state['params']['img']['head'][
      'kernel'].shape
  assert os.listdir(cwd) == []


def test_weight_files_and_model_init_paths_on_gs(gcs):
  root, cwd = gcs
  params = {'img': {'kernel': np.arange(6.0).reshape(2, 3)}, 'b': np.ones(2)}
  io.save_params('gs://bucket/w.npz', params)
  got = io.load_params('gs://bucket/w.npz')
  np.testing.assert_array_equal(got['img']['kernel'], params['img']['kernel'])
  io.save_safetensors('gs://bucket/oc.safetensors', tree.flatten(params))
  assert sorted(io.load_state_dict('gs://bucket/oc.safetensors')) == ['b', 'img/kernel']
  c = demo.get_config('tiny')
  c.model_init = 'gs://bucket/w.npz'
  validate_lib.validate(c)  # Exists: accepted (was os.path.exists: always refused).
  c.model_init = 'gs://bucket/missing.npz'
  with pytest.raises(ValueError, match=r"model_init='gs://bucket/missing.npz' does not exist"):
    validate_lib.validate(c)
  assert files_under(root) == ['bucket/oc.safetensors', 'bucket/w.npz']
  assert os.listdir(cwd) == []


def test_a_gs_workdir_without_orbax_s_gcs_client_is_a_clear_error(gcs, monkeypatch):
  from orbax.checkpoint._src.path import gcs_utils
  from mmcl import checkpoint

  def get_bucket(name):  # What orbax's lookup does without the optional package.
    del name
    raise ImportError("cannot import name 'storage' from 'google.cloud'")
  monkeypatch.setattr(gcs_utils, 'get_bucket', get_bucket)
  with pytest.raises(ImportError, match=r'gs://bucket/run/ckpt.*needs google-cloud-storage'):
    checkpoint.Checkpointer('gs://bucket/run')


def _write_rows(workdir, steps, tail=''):
  with open(os.path.join(workdir, 'metrics.jsonl'), 'w') as f:
    f.writelines(json.dumps({'step': s, 'train/loss': 1.0}) + '\n' for s in steps)
    f.write(tail)


def test_a_torn_last_metrics_line_is_repaired_on_resume_and_said(tmp_path, caplog):
  workdir = str(tmp_path)
  _write_rows(workdir, [1, 2, 3], tail='{"step": 4, "train/lo')  # Killed mid-write.
  writer = metrics_lib.MetricWriter(workdir, resume_step=3, tensorboard=False)
  assert 'metrics.jsonl: dropped its torn last line 4' in caplog.text
  assert str(tmp_path / 'metrics.jsonl') in caplog.text
  writer.write(4, {'train/loss': 0.5})
  writer.close()
  assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3, 4]
  # A complete last row without its newline is kept, and the next row not glued to it.
  _write_rows(workdir, [1], tail='{"step": 2}')
  writer = metrics_lib.MetricWriter(workdir, resume_step=5, tensorboard=False)
  writer.write(3, {})
  writer.close()
  assert [r['step'] for r in metrics_lib.read_metrics(workdir)] == [1, 2, 3]


def test_a_bad_metrics_line_elsewhere_names_the_file_and_line(tmp_path):
  _write_rows(str(tmp_path), [1], tail='{"step": 2, "tr\n{"step": 3}\n')
  message = re.escape(f'{tmp_path / "metrics.jsonl"}, line 2 is not JSON')
  with pytest.raises(ValueError, match=message):
    metrics_lib.read_metrics(str(tmp_path))
  with pytest.raises(ValueError, match=message):
    metrics_lib.MetricWriter(str(tmp_path), resume_step=3, tensorboard=False)


def _lock_record(tmp_path, **fields):
  record = dict(host=socket.gethostname(), pidns=workdir_lock._pid_namespace(),
                pid=os.getpid(), token='other', started=time.time(), heartbeat=time.time())
  record.update(fields)
  (tmp_path / 'lock').write_text(json.dumps(record))


@pytest.fixture
def live_pid():
  p = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])
  yield p.pid
  p.kill()
  p.wait()


def test_a_second_run_into_a_workdir_in_use_is_refused(shapes_data_dir, tmp_path, live_pid):
  _lock_record(tmp_path, pid=live_pid)
  c = demo.get_config('tiny')
  c.data_dir, c.progress_bar, c.evals = shapes_data_dir, False, {}
  host = socket.gethostname()
  with pytest.raises(workdir_lock.WorkdirInUse,
                     match=re.escape(f"in use by pid {live_pid} on host '{host}'")):
    loop.run(c, str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['lock']  # Refused before any file was written.
  # From another host, a lock with a fresh heartbeat is refused too.
  _lock_record(tmp_path, host='other-vm', pid=1)
  with pytest.raises(workdir_lock.WorkdirInUse, match=r"pid 1 on host 'other-vm'"):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      pass
  # Another container on this host (its own pids): a pid we cannot see proves nothing.
  _lock_record(tmp_path, pidns=-1, pid=2**22 + 1)
  with pytest.raises(workdir_lock.WorkdirInUse, match=rf'pid {2**22 + 1} on host'):
    with workdir_lock.WorkdirLock(str(tmp_path)):
      pass


def test_a_stale_lock_is_taken_over_with_a_message_and_released(tmp_path, capsys):
  dead = subprocess.run([sys.executable, '-c', 'import os; print(os.getpid())'],
                        capture_output=True, text=True, check=True)
  _lock_record(tmp_path, pid=int(dead.stdout))  # Killed on this host: its pid is gone.
  with workdir_lock.WorkdirLock(str(tmp_path)) as lock:
    assert json.loads((tmp_path / 'lock').read_text())['pid'] == os.getpid()
  assert f'pid {int(dead.stdout)}' in capsys.readouterr().out
  assert not os.path.exists(lock.path)  # Released.
  # Another host's lock whose heartbeat stopped (a VM that vanished).
  _lock_record(tmp_path, host='other-vm', pid=1, heartbeat=time.time() - 1000)
  with workdir_lock.WorkdirLock(str(tmp_path), stale_s=300):
    pass
  assert 'last heartbeat was 1000 s ago' in capsys.readouterr().out


def test_the_lock_heartbeat_keeps_it_fresh(tmp_path):
  with workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.05):
    first = json.loads((tmp_path / 'lock').read_text())['heartbeat']
    time.sleep(0.5)
    assert json.loads((tmp_path / 'lock').read_text())['heartbeat'] > first


def test_fs_paths():
  assert fs.join('gs://b/run', 'ckpt') == 'gs://b/run/ckpt'
  assert fs.join('rel', 'x') == os.path.join(os.getcwd(), 'rel', 'x')
  assert fs.is_remote('gs://b') and not fs.is_remote('/tmp/x')
