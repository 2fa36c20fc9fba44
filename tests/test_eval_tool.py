"""tools/eval.py on a tiny demo checkpoint: the CLI table and metrics file, --checkpoint
picking its step, --evals subsets, and clear errors."""
import json
import os
import subprocess
import sys

import pytest

from configs import demo
from mmcl.train import checkpoint_eval
from mmcl.train import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KINDS = ('zeroshot', 'retrieval', 'probe', 'geometry')


def _config(data_dir):
  c = demo.get_config('tiny')
  c.data_dir = data_dir
  c.progress_bar = False
  return c


@pytest.fixture(scope='module')
def workdir(shapes_data_dir, tmp_path_factory):
  """2 steps of the tiny demo (checkpoints at 1 and 2), trained without evals."""
  c = _config(shapes_data_dir)
  c.total_steps, c.ckpt_every, c.log_every = 2, 1, 1
  c.input.shuffle_buffer = 32  # Fast start; the order does not matter here.
  c.evals = {}
  w = str(tmp_path_factory.mktemp('eval_tool'))
  loop.run(c, w)
  assert sorted(os.listdir(os.path.join(w, 'ckpt'))) == ['1', '2']
  return w


def test_cli_two_processes_match_one(workdir, shapes_data_dir):
  """tools/eval.py as 2 processes x 4 devices; process 0 prints and writes; the numbers match
  an in-process run on 8 devices (up to float noise between different batch layouts)."""
  procs, port = [], _free_port()
  for pid in range(2):
    env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=4',
               JAX_PLATFORMS='cpu')
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, 'tools', 'eval.py'),
         f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny', f'--workdir={workdir}',
         f'--config.data_dir={shapes_data_dir}', f'--coordinator=127.0.0.1:{port}',
         '--num_processes=2', f'--process_id={pid}'],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  out = outs[0][0]
  assert 'Evaluation at step 2' in out and 'Evaluation' not in outs[1][0]
  for kind in KINDS:
    assert f'\n{kind}/mmcl_shapes\n' in out, out
  assert '  shape/top1' in out and '  5shot/top1' in out and '  modality_gap' in out
  with open(os.path.join(workdir, 'eval', 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1 and rows[0]['step'] == 2  # Written once, by process 0.
  two = rows[0]
  for kind in KINDS:
    assert any(k.startswith(f'{kind}/mmcl_shapes/') for k in two), kind
  # Zero-shot sums hit counts over processes; geometry (like retrieval and probes) gathers
  # embeddings. One in-process run of both, on the checkpoint's path, checks each combine.
  c = _config(shapes_data_dir)
  step, one = checkpoint_eval.evaluate_checkpoint(
      c, checkpoint=os.path.join(workdir, 'ckpt', '2'), only=['geometry', 'zeroshot'])
  assert step == 2
  assert set(one) == {k for k in two if k.split('/')[0] in ('geometry', 'zeroshot')}
  for k, v in one.items():
    if k.startswith('geometry/'):
      assert v == pytest.approx(two[k], rel=1e-4, abs=1e-5), k
    else:  # Near-tied scores of a 2-step model may swap under a different batch layout.
      assert v == pytest.approx(two[k], abs=0.02), k
  with open(os.path.join(workdir, 'eval', 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == [2, 2]  # Appended, never dropped.
  assert checkpoint_eval.resolve_checkpoint(None, os.path.join(workdir, 'ckpt', '2/')) == (
      workdir, 2)


def test_cli_every_step_table_and_plot(workdir, shapes_data_dir, tmp_path):
  """--steps=all: one row per metric, one column per checkpoint, evals.png; the numbers are
  the ones written to metrics.jsonl for each step."""
  out_dir = str(tmp_path / 'sweep')
  p = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'eval.py'),
       f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny', f'--workdir={workdir}',
       f'--config.data_dir={shapes_data_dir}', '--evals=geometry,zeroshot', '--steps=all',
       f'--out_dir={out_dir}'],
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=300)
  assert p.returncode == 0, p.stderr[-3000:]
  with open(os.path.join(out_dir, 'metrics.jsonl')) as f:
    rows = {r.pop('step'): r for r in map(json.loads, f)}
  assert sorted(rows) == [1, 2]
  assert rows[1] != rows[2]  # Each column is its own checkpoint's parameters.
  lines = p.stdout.strip().splitlines()
  assert lines[0].split() == ['metric', '1', '2']
  table = {line.split()[0]: line.split()[1:] for line in lines[1:] if not
           line.startswith('Plot:')}
  assert set(table) == set(rows[1]) and any(k.startswith('geometry/') for k in table)
  for name, cells in table.items():
    assert [float(c) for c in cells] == pytest.approx(
        [rows[1][name], rows[2][name]], abs=5e-5), name
  assert os.path.getsize(os.path.join(out_dir, 'evals.png')) > 1000
  assert f'Plot: {os.path.join(out_dir, "evals.png")}' in p.stdout
  bad = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'eval.py'),
       f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny',
       f'--checkpoint={workdir}/ckpt/2', '--steps=1'],
      env=dict(os.environ, JAX_PLATFORMS='cpu'), capture_output=True, text=True, timeout=300)
  assert bad.returncode != 0 and '--steps goes with --workdir' in bad.stderr


def _free_port():
  import socket
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_errors(workdir, shapes_data_dir, tmp_path):
  c = _config(shapes_data_dir)
  with pytest.raises(ValueError, match='exactly one of --workdir'):
    checkpoint_eval.evaluate_checkpoint(c)
  with pytest.raises(ValueError, match='not a <workdir>/ckpt/<step>'):
    checkpoint_eval.evaluate_checkpoint(c, checkpoint=str(tmp_path))
  with pytest.raises(ValueError, match=r"Unknown evals \['nope'\]; valid: \['geometry'"):
    checkpoint_eval.evaluate_checkpoint(c, workdir=workdir, only=['nope'])
  with pytest.raises(FileNotFoundError, match='No checkpoint'):
    checkpoint_eval.evaluate_checkpoint(c, workdir=str(tmp_path), only=['geometry'])
  with pytest.raises(FileNotFoundError, match=r'No checkpoint at step 7 .*steps: \[1, 2\]'):
    checkpoint_eval.evaluate_steps(c, workdir, [7], only=['geometry'])
  c.model.embed_dim = 128  # The checkpoint's heads project to 64: name them (was orbax's
  # "Requested shape (128,) ..." with no name and advice to set strict=False).
  with pytest.raises(ValueError, match=r'does not match the model: missing none; unexpected '
                     r'none; shape mismatches .*img/head/kernel: checkpoint \(\d+, 64\) vs '
                     r'model \(\d+, 128\)') as e:
    checkpoint_eval.evaluate_checkpoint(c, workdir=workdir, only=['geometry'])
  assert 'strict' not in str(e.value)


def test_format_table_groups_by_evaluator_and_dataset():
  table = checkpoint_eval.format_table(
      {'zeroshot/imagenet2012/top1': 0.75, 'zeroshot/imagenet2012/top5': 0.9,
       'retrieval/coco_captions/i2t_r1': 0.5, 'misc': 1.0}, step=7)
  lines = table.splitlines()
  assert lines[0] == 'Evaluation at step 7'
  assert [line.split() for line in lines[1:]] == [
      ['misc', '1.0000'], ['retrieval/coco_captions'], ['i2t_r1', '0.5000'],
      ['zeroshot/imagenet2012'], ['top1', '0.7500'], ['top5', '0.9000']]
  assert lines[-1].startswith('  top5 ')  # Metrics indented under their heading.
