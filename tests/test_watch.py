"""Watching a run: profiler windows, MFU, time split, memory, input health, W&B, the report."""
import contextlib
import glob
import io
import json
import os
import struct
import time

import jax
import numpy as np
import pytest

from configs import demo
from mmcl.data import input_pipeline
from mmcl.models import flops as flops_lib
from mmcl.train import loop, profile, report, throughput
from mmcl.train import metrics as metrics_lib


def tiny_config(data_dir, **overrides):
  c = demo.get_config('tiny')
  c.data_dir = data_dir
  c.progress_bar = False
  c.model.image.depth = c.model.text.depth = 1
  c.update_from_flattened_dict(overrides)
  return c


def _train_rows(workdir):
  return [r for r in metrics_lib.read_metrics(workdir) if 'train/loss' in r]


INPUT_SLEEP = 0.05  # Seconds each batch is held back: the input wait the log must show.


@pytest.fixture(scope='module')
def watched_run(shapes_data_dir, tmp_path_factory):
  """A tiny run with a profile window (steps 2-3), a zero-shot eval every 4 steps and a
  slow input; returns (config, workdir, what it printed)."""
  workdir = str(tmp_path_factory.mktemp('watched'))
  c = tiny_config(shapes_data_dir, total_steps=8, log_every=4, ckpt_every=100,
                  **{'profile.steps': (2,), 'profile.num_steps': 2})
  c.evals = {'zeroshot': dict(c.evals.zeroshot)}
  c.evals.zeroshot.every = 4
  slow_next = input_pipeline.ShardedBatches.__next__

  def held_back(self):
    time.sleep(INPUT_SLEEP)
    return slow_next(self)
  out = io.StringIO()
  with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
    mp.setattr(input_pipeline.ShardedBatches, '__next__', held_back)
    loop.run(c, workdir)
  return c, workdir, out.getvalue()


@pytest.mark.slow
def test_profile_window_writes_a_tensorboard_trace_and_prints_its_ops(watched_run):
  _, workdir, printed = watched_run
  # TensorBoard's profile plugin layout: <logdir>/plugins/profile/<run>/<host>.xplane.pb.
  runs = glob.glob(os.path.join(workdir, 'tb', 'plugins', 'profile', '*'))
  assert len(runs) == 1, runs
  from tensorflow.tsl.profiler.protobuf import xplane_pb2
  space = xplane_pb2.XSpace()
  with open(glob.glob(os.path.join(runs[0], '*.xplane.pb'))[0], 'rb') as f:
    space.ParseFromString(f.read())
  assert any(p.name.startswith('/host:CPU') and p.lines for p in space.planes), [
      p.name for p in space.planes]
  assert 'Profile of steps 2..3:' in printed
  table = printed.split('Profile of steps 2..3:\n', 1)[1].splitlines()
  assert table[0].endswith(f'trace in {os.path.join(workdir, "tb")}'), table[:2]
  times = [float(line.split()[0]) for line in table[1:26] if line.endswith(('_0', '*'))
           or 'Dense' in line]
  assert any('encoderblock_*' in line for line in table[1:26]), table[:10]
  assert times and times[0] > 0


@pytest.mark.slow
def test_log_has_throughput_mfu_time_split_and_input_health(watched_run):
  c, workdir, printed = watched_run
  rows = _train_rows(workdir)
  assert [r['step'] for r in rows] == [4, 8]
  analytic = flops_lib.train_step_flops(c.model, c.image_size, c.text_len,
                                        global_batch=c.batch_size,
                                        local_batch=c.batch_size // 8)['train']
  for r in rows:
    split = [r[f'train/time/{k}_fraction'] for k in ('input', 'compute', 'other')]
    assert sum(split) == pytest.approx(1.0, abs=1e-6) and min(split) >= 0, split
    # Each batch was held back INPUT_SLEEP seconds: at least that is waiting for input.
    assert r['train/time/input_sec_per_batch'] >= INPUT_SLEEP, r
    assert r['train/examples_per_sec'] == pytest.approx(r['train/steps_per_sec'] * 32)
    # Against one peak (measured at the start, so on a loaded machine not bounded by 1).
    assert r['train/mfu'] > 0
    assert r['train/mfu'] / r['train/flops_per_sec_per_device'] == pytest.approx(
        rows[0]['train/mfu'] / rows[0]['train/flops_per_sec_per_device'])
    # FLOP/s over the training time, per device, is the compiled step's count (8 devices):
    # the analytic matmul count plus element-wise work.
    per_example = (r['train/flops_per_sec_per_device'] * 8 / r['train/examples_per_sec'] *
                   (1 - r['train/time/other_fraction']))
    assert 1.0 < per_example / analytic < 1.15, (per_example, analytic)
    # Records read = kept (the batches taken, the next one included at a mid-run log) + dropped.
    kept = r['data/shard0/read_records'] - r['data/shard0/dropped_records']
    assert kept in (32 * r['step'], 32 * (r['step'] + 1)), r
    assert r['data/read_records'] == r['data/shard0/read_records']
    assert r['data/queued_records'] >= 0 and r['data/dropped_records'] == 0
  # The eval at step 4 (and the profile's summary) ran before the first row was written
  # (at step 5's dispatch): 'other', not training.
  assert rows[0]['train/time/other_fraction'] > 0
  # No memory figures on the CPU: said once, no zeros logged.
  assert not any(k.startswith('memory/') for r in rows for k in r)
  assert printed.count('reports none (device.memory_stats())') == 1
  assert 'peak' in printed and 'measured 1024x1024 fp32 matmul' in printed


@pytest.mark.slow
def test_report_writes_the_page_and_plots_with_data(watched_run, tmp_path):
  import matplotlib.image
  _, workdir, _ = watched_run
  result = report.write(workdir, str(tmp_path))
  assert set(result['plots']) == {'training.png', 'evals.png'}  # Not MoE: no experts plot.
  page = open(result['page']).read()
  for name, points in result['plots'].items():
    assert points > 0, result
    assert f']({name})' in page
    image = matplotlib.image.imread(tmp_path / name)
    assert image.shape[0] > 100 and image[..., :3].std() > 0.05
  # Zero-shot top-1 at steps 4 (every=4) and 8 (final) for three tasks.
  rows = metrics_lib.read_metrics(workdir)
  zeroshot = [r['step'] for r in rows if 'zeroshot/mmcl_shapes/shape/top1' in r]
  assert zeroshot == [4, 8]
  assert '| zeroshot/mmcl_shapes/shape/top1 |' in page and '"total_steps": 8' in page
  assert 'jax ' + jax.__version__ in page


def test_experts_plot_only_for_moe_runs(tmp_path):
  rows = [{'step': 10, 'train/loss': 1.0, 'train/moe/layer1/image/expert0': 0.75,
           'train/moe/layer1/image/expert1': 0.25}]
  with open(tmp_path / 'metrics.jsonl', 'w') as f:
    f.writelines(json.dumps(r) + '\n' for r in rows)
  result = report.write(str(tmp_path))
  assert result['plots'] == {'training.png': 1, 'experts.png': 2}
  with pytest.raises(ValueError, match='No metrics in'):
    report.write(str(tmp_path / 'empty'))


class _Device:
  def __init__(self, platform, kind, stats=None):
    self.platform, self.device_kind, self._stats = platform, kind, stats

  def memory_stats(self):
    return self._stats


def test_peaks_and_memory_stats():
  assert throughput.device_peak([_Device('tpu', 'TPU v5 lite')])[0] == 197e12
  assert throughput.device_peak([_Device('gpu', 'NVIDIA H200')])[0] == 989e12
  cpu = jax.devices()
  rate, source = throughput.device_peak(cpu, matmul=256)
  assert rate > 0 and 'shared by 8 host devices' in source
  assert throughput.memory_stats(cpu) is None
  gpus = [_Device('gpu', 'H200', {'bytes_in_use': 5, 'peak_bytes_in_use': 9}),
          _Device('gpu', 'H200', {'bytes_in_use': 7, 'peak_bytes_in_use': 8})]
  assert throughput.memory_stats(gpus) == {'bytes_in_use': 7, 'peak_bytes_in_use': 9}
  with pytest.raises(ValueError, match="valid: \\('first', 'all'\\)"):
    profile.ProfileWindows({'steps': (1,), 'processes': 'some'}, '/tmp', None)


def _wandb_records(path):
  """The records of a .wandb file (a LevelDB-style log: 32 KiB blocks of chunks with a
  7-byte header: crc32, length, type), as wandb_internal_pb2.Record."""
  from wandb.proto import wandb_internal_pb2
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B'
  pos, chunk, records = 7, b'', []
  while pos + 7 <= len(data):
    if 32768 - pos % 32768 < 7:  # Block padding.
      pos += 32768 - pos % 32768
      continue
    _, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
    if kind == 0:
      break
    chunk += data[pos + 7:pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):  # A whole record, or the last chunk of one.
      records.append(wandb_internal_pb2.Record.FromString(chunk))
      chunk = b''
  return records


@pytest.mark.slow
def test_wandb_offline_resumed_run_is_one_run(shapes_data_dir, tmp_path, monkeypatch):
  pytest.importorskip('wandb')
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  workdir = str(tmp_path)
  c = tiny_config(shapes_data_dir, total_steps=6, log_every=3, ckpt_every=3,
                  **{'wandb.enabled': True})
  c.evals = {}
  loop.run(c, workdir)
  c.total_steps = 9
  loop.run(c, workdir)  # Resumes from step 6.
  run_id = open(os.path.join(workdir, 'wandb_run_id')).read().strip()
  files = sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*', 'run-*.wandb')))
  assert len(files) == 2 and all(f.endswith(f'run-{run_id}.wandb') for f in files), files
  history = {}
  for path in files:
    records = _wandb_records(path)
    assert {r.run.run_id for r in records if r.WhichOneof('record_type') == 'run'} == {run_id}
    for r in records:
      if r.WhichOneof('record_type') == 'history':
        items = {i.key or '/'.join(i.nested_key): json.loads(i.value_json)
                 for i in r.history.item}
        history[r.history.step.num] = items
  assert sorted(history) == [3, 6, 9]
  rows = {r['step']: r for r in _train_rows(workdir)}
  for step, items in history.items():
    assert items['train/loss'] == pytest.approx(rows[step]['train/loss'])
    assert items['train/mfu'] == pytest.approx(rows[step]['train/mfu'])
