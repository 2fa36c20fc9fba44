"""Faults: non-finite updates, corrupt records, mismatched checkpoints, bad configs."""
import functools
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import demo
from mmcl.data import input_pipeline
from mmcl.data.shapes import builder as shapes_builder
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import loop
from mmcl.train import metrics as metrics_lib


def tiny_config(data_dir, **overrides):
  c = demo.get_config('tiny')
  c.data_dir, c.progress_bar = data_dir, False
  c.update_from_flattened_dict(overrides)
  return c


class _NaNAfter:
  """Wraps the training stream: images become NaN from step `start` on."""

  def __init__(self, batches, start):
    self.batches, self.start, self.step = batches, start, 0

  def __getattr__(self, name):
    return getattr(self.batches, name)

  def __next__(self):
    batch = next(self.batches)
    self.step += 1
    if self.step >= self.start:
      batch['image'] = batch['image'] * jnp.nan
    return batch


def test_non_finite_updates_are_skipped_counted_and_stop_the_run(
    shapes_data_dir, tmp_path, monkeypatch):
  make = loop.make_batches
  monkeypatch.setattr(loop, 'make_batches', lambda *a: _NaNAfter(make(*a), start=3))
  c = tiny_config(shapes_data_dir, total_steps=20, log_every=1, ckpt_every=2,
                  max_skipped_steps=3)
  with pytest.raises(FloatingPointError, match=r'3 consecutive.*step 5.*train/loss.*nan'):
    loop.run(c, str(tmp_path))
  rows = {r['step']: r for r in metrics_lib.read_metrics(str(tmp_path)) if 'train/loss' in r}
  assert [rows[s]['train/skipped_total'] for s in (1, 2, 3, 4)] == [0, 0, 1, 2]
  # Steps 3 and 4 were skipped: the step-4 checkpoint holds the step-2 parameters.
  import orbax.checkpoint as ocp
  ckpt = ocp.StandardCheckpointer()
  p2 = ckpt.restore(str(tmp_path / 'ckpt' / '2' / 'default'))['params']
  p4 = ckpt.restore(str(tmp_path / 'ckpt' / '4' / 'default'))['params']
  for a, b in zip(jax.tree.leaves(p2), jax.tree.leaves(p4)):
    np.testing.assert_array_equal(a, b)


def _png(size):
  return shapes_builder.encode_png(np.full((size, size, 3), 7, np.uint8))


def test_corrupt_and_misshapen_records_are_dropped_and_counted(shapes_data_dir):
  images = [_png(64), b'not a png', _png(64), _png(64), b'\x89PNG\r\n\x1a\nbroken', _png(64),
            _png(32), _png(64)]  # Bad: 1, 4 (corrupt), 6 (32 px).

  def as_dataset(self, *args, **kwargs):
    del self, args, kwargs
    return tf.data.Dataset.from_tensor_slices({'image': images})

  mesh = mesh_lib.create_mesh([('data', 1)], jax.devices()[:1])
  make = functools.partial(
      input_pipeline.get_dataset, name='mmcl_shapes/tiny', split='train',
      pp='decode|keep("image")', batch_size=5, data_dir=shapes_data_dir, shuffle_buffer=1,
      with_index=True, shapes={'image': (64, 64, 3)})
  with tfds.testing.mock_data(as_dataset_fn=as_dataset):
    batches = input_pipeline.ShardedBatches(lambda i: make(process_index=i), [0], 1,
                                            mesh_lib.batch_sharding(mesh))
    first = next(batches)
  assert first['image'].shape == (5, 64, 64, 3)
  assert batches.dropped == 3  # Records 0..7 read, 5 kept.


def test_mismatched_checkpoint_is_refused_with_the_parameter_names(shapes_data_dir, tmp_path):
  c = tiny_config(shapes_data_dir, total_steps=2, ckpt_every=2)
  c.evals = {}
  loop.run(c, str(tmp_path))
  c.model.text.depth = 3  # pico has 2 layers: the checkpoint lacks encoderblock_2.
  c.total_steps = 4
  with pytest.raises(ValueError, match=r'does not match the model: missing '
                     r'txt/Transformer/encoderblock_2/.*unexpected none'):
    loop.run(c, str(tmp_path))


def test_data_state_of_another_shard_count_is_refused(shapes_data_dir, tmp_path):
  mesh = mesh_lib.create_mesh([('data', 8)])
  make = functools.partial(
      input_pipeline.get_dataset, name='mmcl_shapes/tiny', split='train',
      pp='decode|keep("image")', batch_size=16, data_dir=shapes_data_dir, with_index=True)
  two = input_pipeline.ShardedBatches(lambda i: make(process_index=i, process_count=2),
                                      [0, 1], 2, mesh_lib.batch_sharding(mesh))
  next(two)
  two.save(str(tmp_path))
  one = input_pipeline.ShardedBatches(lambda i: make(process_index=i, process_count=1),
                                      [0], 1, mesh_lib.batch_sharding(mesh))
  with pytest.raises(ValueError, match=r"shards \['shard_0', 'shard_1'\].*config.input.shards"):
    one.restore(str(tmp_path))
