"""End-to-end training on the synthetic dataset: loss falls, meshes, resume, bad configs."""
import json
import os

import jax
import numpy as np
import pytest

from configs import demo
from mmcl.train import loop
from mmcl.train import metrics as metrics_lib


def tiny_config(data_dir, **overrides):
  c = demo.get_config('tiny')
  c.data_dir = data_dir
  c.progress_bar = False
  c.update_from_flattened_dict(overrides)
  return c


def _train_rows(workdir):
  return [r for r in metrics_lib.read_metrics(workdir) if 'train/loss' in r]


def test_loss_falls_and_final_evals_are_reported(shapes_data_dir, tmp_path):
  c = tiny_config(shapes_data_dir, total_steps=80, log_every=1, ckpt_every=100)
  final = loop.run(c, str(tmp_path))
  losses = [r['train/loss'] for r in _train_rows(str(tmp_path))]
  assert [r['step'] for r in _train_rows(str(tmp_path))] == list(range(1, 81))
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
  for task in ('shape', 'color', 'combo'):
    assert 0.0 <= final[f'zeroshot/mmcl_shapes/{task}/top1'] <= 1.0
  assert final['retrieval/mmcl_shapes/i2t_r10'] >= final['retrieval/mmcl_shapes/i2t_r1']
  # Colour is learned within a few dozen steps even by the tiny model: above chance (1/8).
  assert final['zeroshot/mmcl_shapes/color/top1'] > 0.3


@pytest.mark.parametrize('mesh,impl', [([('data', 8)], 'gather'),
                                       ([('data', 4), ('fsdp', 2)], 'ring')])
def test_sharded_meshes_and_resume(shapes_data_dir, tmp_path, mesh, impl):
  workdir = str(tmp_path)
  c = tiny_config(shapes_data_dir, total_steps=10, ckpt_every=5, log_every=1, mesh=mesh,
                  sharding_rules=[('.*', 'fsdp')], **{'loss.impl': impl})
  c.evals = {}
  loop.run(c, workdir)
  assert sorted(os.listdir(os.path.join(workdir, 'ckpt'))) >= ['10', '5']
  # Pretend the run died after logging steps 11-12 but before checkpointing them.
  with open(os.path.join(workdir, 'metrics.jsonl'), 'a') as f:
    for step in (11, 12):
      f.write(json.dumps({'step': step, 'train/loss': 0.0}) + '\n')
  c.total_steps = 15
  loop.run(c, workdir)
  steps = [r['step'] for r in _train_rows(workdir)]
  assert steps == list(range(1, 16)), steps  # Continues at 11, never repeats a step.
  assert _train_rows(workdir)[10]['train/loss'] != 0.0


def test_fsdp_shards_parameters_and_optimizer_state(shapes_data_dir):
  from mmcl import models
  from mmcl.parallel import mesh as mesh_lib
  from mmcl import tree
  from mmcl.train import optim, step as step_lib
  c = tiny_config(shapes_data_dir, mesh=[('data', 4), ('fsdp', 2)])
  mesh = mesh_lib.create_mesh(c.mesh)
  model = models.get_model(c.model)
  shapes = loop._batch_shapes(c, mesh)
  rng = jax.random.key(0)
  params = jax.eval_shape(lambda: model.init(rng, np.zeros(shapes['image'].shape, np.float32),
                                             np.zeros(shapes['text'].shape, np.int32)))
  tx = optim.make_optimizer(c, params['params'])
  _, shardings = step_lib.state_shardings(params['params'], tx, mesh, [('.*', 'fsdp')])
  # pico's 64x256 MLP kernels exceed the FSDP size threshold and must be split, in the
  # parameters and in Adam's moments alike.
  kernel = 'img/Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'
  by_path = {tree.path_str(p): s.spec
             for p, s in jax.tree_util.tree_leaves_with_path(shardings)}
  assert 'fsdp' in tuple(by_path[f'params/{kernel}'])
  assert any(k.endswith(f'mu/{kernel}') and 'fsdp' in tuple(v) for k, v in by_path.items())


@pytest.mark.parametrize('override,match', [
    ({'model.image.variant': 'Huge/3'}, r"Huge.*valid"),
    ({'loss.name': 'triplet'}, r"Unknown loss 'triplet'.*softmax"),
    ({'input.pp': 'decode|sharpen(2)'}, r"Unknown pp op 'sharpen'.*valid ops"),
    ({'batch_size': 36}, r'batch_size=36 does not divide over the 8 batch shards'),
    ({'mesh': [('data', 3)]}, r'does not fit 8 devices'),
    ({'optim.freeze': '.*'}, r'freezes every parameter'),
    ({'accum_steps': 3}, r'accum_steps=3 must be >= 1 and split'),
    ({'temperature.type': 'annealed'}, r"Unknown config.temperature.type 'annealed'"),
])
def test_bad_config_fails_before_compiling(shapes_data_dir, tmp_path, override, match):
  c = tiny_config(shapes_data_dir, **override)
  with pytest.raises(ValueError, match=match):
    loop.run(c, str(tmp_path))
  assert not os.path.exists(os.path.join(tmp_path, 'ckpt', '1'))
