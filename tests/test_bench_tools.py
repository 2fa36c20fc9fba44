"""Smoke tests of the benchmark tools' functions and the analytic FLOP count (no timings)."""
import importlib.util
import os
import time

import numpy as np
import pytest

from configs import bench_small, demo, limoe_b16, siglip2_demo
from mmcl import models
from mmcl.models import flops

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tool(name):
  spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, 'tools', f'{name}.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_bench_small_is_the_issue_model():
  c = bench_small.get_config()
  assert c.batch_size == 128 and c.loss.name == 'softmax' and c.optim.name == 'adamw'
  # open_clip's CLIP of bench_small's docstring has the same count (measured, torch 2.14.1).
  assert flops.param_count(c.model, c.image_size, c.text_len) == 9_153_025


@pytest.mark.parametrize('config', [demo.get_config('tiny'), bench_small.get_config('tiny')],
                         ids=['demo_tiny', 'bench_small_tiny'])
def test_analytic_forward_flops_match_xla(config):
  analytic = flops.two_towers_forward(config.model, config.image_size, config.text_len)
  xla = models.summarize(config.model, config.image_size, config.text_len, batch=4)
  # XLA also counts element-wise work (LayerNorm, GELU, softmax): a few percent more.
  assert 1.0 <= xla['forward_flops'] / (analytic['image'] + analytic['text']) < 1.06


def test_train_step_flops_of_paper_configs():
  # LIMoE-B/16: 32 experts every 2nd layer, top-1, capacity 1: about the dense B/16 count.
  c = limoe_b16.get_config()
  f = flops.train_step_flops(c.model, 224, 16, global_batch=32768, local_batch=128)
  dense = flops.encoder_flops(196, 768, 12, 3072)
  assert 1.0 < f['image'] / dense < 1.15
  assert f['train'] == pytest.approx(3 * f['forward'] - 2 * 196 * 16 * 16 * 3 * 768)


def _patch_dropout(c):
  c.model.image.patch_dropout = 0.5
  return c


def _distill_on(c):
  c.self_distill.start_fraction = 0.0
  return c


@pytest.mark.parametrize('config', [
    _patch_dropout(siglip2_demo.get_config('tiny')),  # Decoder over the kept tokens.
    _distill_on(siglip2_demo.get_config('tiny,distill')),  # Decoder + SILC + TIPS passes.
    demo.get_config('tiny,naflex'),  # 64-token budget, half of it padding for 16-token draws.
], ids=['siglip2_patch_dropout', 'siglip2_distill', 'naflex'])
def test_config_flops_match_the_compiled_step(config):
  from mmcl.train import config_flops, loop, throughput
  s = loop.setup(config)
  xla = throughput.step_flops(s.compile()) * s.mesh.size / config.batch_size
  f = config_flops.train_flops(config, local_batch=config.batch_size // s.mesh.size)
  assert (f['self_distill'] > 0) == bool(config.self_distill.local_weight)
  # Element-wise work, the optimizer and the loss's extras on top of the matmul count.
  assert 1.0 <= xla / f['train'] < 1.15, (xla, f)


def test_random_batch_has_eot_tokens():
  bench_step = _tool('bench_step')
  c = bench_small.get_config('tiny')
  batch = bench_step.random_batch(c, 16)
  assert batch['image'].shape == (16, 64, 64, 3) and batch['text'].shape == (16, 32)
  assert batch['text'].dtype == np.int32 and (batch['text'][:, 0] > 0).all()
  assert (batch['text'] == 0).any() and batch['text'].max() < 4096


def test_bench_step_runs_the_real_step_on_8_devices(tmp_path, capsys):
  bench_step = _tool('bench_step')
  c = demo.get_config('tiny')
  c.model.image.depth = c.model.text.depth = 1
  c.progress_bar = False
  row = bench_step.bench_step(c, steps=1, warmup=0, matmul=256, trace_dir=str(tmp_path))
  assert row['devices'] == 8 and row['examples_per_sec'] > 0 and row['mfu'] > 0
  assert row['page_faults_per_step'] >= 0 and row['kernel_cpu_sec_per_step'] >= 0
  # The op table names the step's ops and the model code that made them, biggest first.
  table = capsys.readouterr().err.splitlines()
  assert table[0].endswith(f'trace in {tmp_path}'), table[:2]
  times = [float(line.split()[0]) for line in table[1:]]
  assert len(times) > 5 and times == sorted(times, reverse=True)
  assert any('img/Transformer/encoderblock_*/MlpBlock_0/Dense_0' in line for line in table)
  # cost_analysis is per device: times 8 devices it is the analytic count plus element-wise.
  assert 1.0 < row['flops_ratio'] < 1.15, row
  assert set(row['collectives']) == {'all-reduce', 'all-gather', 'reduce-scatter'}
  assert row['peak_bytes_per_device'] > row['temp_bytes_per_device'] > 0


def test_bench_step_compile_only_with_scan():
  bench_step = _tool('bench_step')
  c = demo.get_config('tiny')
  c.model.scan = True
  c.progress_bar = False
  row = bench_step.bench_step(c, steps=0, warmup=0)
  assert 'examples_per_sec' not in row and row['compile_sec'] > 0
  # XLA's cost analysis counts a loop body once: under scan it undercounts the layers.
  assert row['flops_ratio'] < 1.0, row


def test_bench_parts_alternates_and_reports_medians():
  bench_parts = _tool('bench_parts')
  calls = []
  ms = bench_parts.alternate({'a': lambda: calls.append('a'),
                              'b': lambda: (calls.append('b'), time.sleep(0.01))}, steps=3)
  assert calls == ['a', 'a', 'b', 'b'] + ['a', 'b'] * 3  # 2 warm-ups each, then in turn.
  assert ms['b'] >= 10 > ms['a'] >= 0


def test_bench_parts_layouts_times_each_variant_once_per_step():
  ms = _tool('bench_parts').layouts(steps=1)
  assert set(ms) == {'mlp_flat_tokens', 'mlp_bxl_tokens', 'attention_heads_first',
                     'attention_flax_default'}
  assert all(v > 0 for v in ms.values()), ms


def test_bench_input_times_the_training_stream(shapes_data_dir):
  from configs import demo as demo_config
  c = demo_config.get_config('tiny')
  c.data_dir = shapes_data_dir
  row = _tool('bench_input').input_examples_per_sec(c, batches=2, warmup=1)
  assert row['local_batch'] == c.batch_size
  assert row['input_examples_per_sec'] > 0 and row['input_mean_examples_per_sec'] > 0


def test_bench_input_sizes_the_data_state(shapes_data_dir, tmp_path):
  from configs import demo as demo_config
  c = demo_config.get_config('tiny')
  c.data_dir = shapes_data_dir
  row = _tool('bench_input').data_state_size(c, 2, str(tmp_path))
  assert row['data_state_bytes'] > 1000 and os.path.isfile(tmp_path / 'shard_0' / 'state')
  assert 0 < row['data_state_snapshot_s'] <= row['data_state_written_s']


def test_bench_precision_prints_the_bf16_logit_error():
  import json
  import subprocess
  import sys
  out = subprocess.run([sys.executable, 'tools/bench_precision.py', '--batch', '256',
                        '--dim', '64'], capture_output=True, text=True, timeout=300,
                       env={**__import__('os').environ, 'JAX_PLATFORMS': 'cpu'})
  assert out.returncode == 0, out.stderr[-2000:]
  row = json.loads(out.stdout.strip().splitlines()[-1])
  # Rounding the inputs to bf16 costs orders of magnitude more than float32 rounding.
  assert row['bf16_inputs_logit_abs_err_max'] > 100 * row['f32_logit_abs_err_max'] > 0
