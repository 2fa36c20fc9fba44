"""tools/eval.py on a tiny demo checkpoint: the CLI table and metrics file, --checkpoint
picking its step, --evals subsets, and clear errors."""
import json
import os
import subprocess
import sys

import pytest

from configs import demo
from mmcl.evaluate import checkpoint_eval
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
  """3 steps of the tiny demo (checkpoints at 2 and 3), trained without evals."""
  c = _config(shapes_data_dir)
  c.total_steps, c.ckpt_every, c.log_every = 3, 2, 1
  c.input.shuffle_buffer = 32  # Fast start; the order does not matter here.
  c.evals = {}
  w = str(tmp_path_factory.mktemp('eval_tool'))
  loop.run(c, w)
  assert sorted(os.listdir(os.path.join(w, 'ckpt'))) == ['2', '3']
  return w


def test_cli_prints_table_and_writes_metrics(workdir, shapes_data_dir):
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=8',
             JAX_PLATFORMS='cpu')
  done = subprocess.run(
      [sys.executable, os.path.join(ROOT, 'tools', 'eval.py'),
       f'--config={os.path.join(ROOT, "configs", "demo.py")}:tiny', f'--workdir={workdir}',
       f'--config.data_dir={shapes_data_dir}'],
      env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout
  assert 'Evaluation at step 3' in out
  for kind in KINDS:
    assert f'\n{kind}/mmcl_shapes\n' in out, out
  assert '  shape/top1' in out and '  5shot/top1' in out and '  modality_gap' in out
  with open(os.path.join(workdir, 'eval', 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  assert len(rows) == 1 and rows[0]['step'] == 3
  for kind in KINDS:
    assert any(k.startswith(f'{kind}/mmcl_shapes/') for k in rows[0]), kind
  assert 0 <= rows[0]['zeroshot/mmcl_shapes/shape/top1'] <= 1
  # In process, the same checkpoint gives the same numbers; --checkpoint picks its step.
  c = _config(shapes_data_dir)
  step, latest = checkpoint_eval.evaluate_checkpoint(c, workdir=workdir, only=['geometry'])
  assert step == 3 and set(latest) == {k for k in rows[0] if k.startswith('geometry/')}
  for k, v in latest.items():
    assert v == pytest.approx(rows[0][k], rel=1e-5, abs=1e-6), k
  step, older = checkpoint_eval.evaluate_checkpoint(
      c, checkpoint=os.path.join(workdir, 'ckpt', '2'), only=['geometry'])
  assert step == 2 and older != latest
  with open(os.path.join(workdir, 'eval', 'metrics.jsonl')) as f:
    assert [json.loads(line)['step'] for line in f] == [3, 3, 2]  # Appended, never dropped.


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
