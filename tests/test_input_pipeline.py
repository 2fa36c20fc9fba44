"""tf.data pipeline: batches, determinism, per-process splits, global jax batches."""
import collections
import hashlib
import itertools

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import common
from configs import demo
from mmcl.data import input_pipeline
from mmcl.parallel import mesh as mesh_lib

DATASET = 'mmcl_shapes/tiny'


def demo_pp():
  c = demo.get_config('tiny')
  c.text_len = 24
  return input_pipeline.format_pp(c.input.pp, c), c.text_len


def train_batches(data_dir, seed, n=2, batch_size=16):
  pp, _ = demo_pp()
  ds = input_pipeline.get_dataset(name=DATASET, split='train', pp=pp, batch_size=batch_size,
                                  data_dir=data_dir, train=True, seed=seed,
                                  shuffle_buffer=512)
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def image_hash(image) -> str:
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(scope='module')
def test_split_hashes(shapes_data_dir):
  """Hashes of the decoded test images, read straight from TFDS."""
  builder = tfds.builder(DATASET, data_dir=shapes_data_dir)
  hashes = [image_hash(ex['image']) for ex in
            tfds.as_numpy(builder.as_dataset(split='test', shuffle_files=False))]
  assert len(hashes) == 128 and len(set(hashes)) == 128
  return hashes


def test_train_batches_have_expected_structure(shapes_data_dir):
  _, text_len = demo_pp()
  for batch in train_batches(shapes_data_dir, seed=0):
    assert set(batch) == {'image', 'text'}
    assert batch['image'].shape == (16, 64, 64, 3) and batch['image'].dtype == np.float32
    assert batch['image'].min() >= -1.0 and batch['image'].max() <= 1.0
    assert batch['image'].min() < -0.5 and batch['image'].max() > 0.5
    assert batch['text'].shape == (16, text_len) and batch['text'].dtype == np.int32
    # Byte tokenizer: EOS (1) once per row, only padding (0) after it.
    for row in batch['text']:
      eos = list(row).index(1)
      assert np.all(row[:eos] >= 2) and np.all(row[eos + 1:] == 0)


def test_train_stream_is_deterministic_per_seed(shapes_data_dir):
  a = train_batches(shapes_data_dir, seed=0)
  b = train_batches(shapes_data_dir, seed=0)
  c = train_batches(shapes_data_dir, seed=1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['image'], y['image'])
    np.testing.assert_array_equal(x['text'], y['text'])
  assert not np.array_equal(a[0]['image'], c[0]['image'])
  # Shuffled: the first training batch is not the first 16 examples in file order.
  assert len({image_hash(im) for im in a[0]['image']}) == 16


def _eval_hashes(data_dir, batch_size, **kwargs):
  ds = input_pipeline.get_dataset(name=DATASET, split='test', pp='decode|keep("image")',
                                  batch_size=batch_size, data_dir=data_dir, train=False,
                                  **kwargs)
  sizes, hashes = [], []
  for batch in ds.as_numpy_iterator():
    sizes.append(len(batch['image']))
    hashes += [image_hash(im) for im in batch['image']]
  return sizes, hashes


def test_process_splits_partition_the_eval_split(shapes_data_dir, test_split_hashes):
  per_process = [_eval_hashes(shapes_data_dir, 32, process_index=i, process_count=2)
                 for i in range(2)]
  (sizes0, h0), (sizes1, h1) = per_process
  assert all(s == 16 for s in sizes0[:-1]) and all(s == 16 for s in sizes1[:-1])
  assert len(h0) == len(h1) == 64
  assert not set(h0) & set(h1)
  counts = collections.Counter(h0 + h1)
  assert set(counts) == set(test_split_hashes) and set(counts.values()) == {1}


def test_process_splits_cover_the_eval_split_when_uneven(shapes_data_dir, test_split_hashes):
  hashes = []
  for i in range(3):
    hashes += _eval_hashes(shapes_data_dir, 48, process_index=i, process_count=3)[1]
  assert sorted(hashes) == sorted(test_split_hashes)


def test_eval_keeps_last_partial_batch(shapes_data_dir, test_split_hashes):
  sizes, hashes = _eval_hashes(shapes_data_dir, 48)
  assert sizes == [48, 48, 32]
  assert hashes == test_split_hashes  # One ordered pass over the split.


def test_batch_size_must_divide_over_processes(shapes_data_dir):
  with pytest.raises(ValueError, match='does not divide'):
    input_pipeline.get_dataset(name=DATASET, split='test', pp='decode', batch_size=33,
                               data_dir=shapes_data_dir, train=False, process_count=2)


def test_format_pp_fills_placeholders():
  c = common.base_config()
  c.text_len, c.image_size, c.tokenizer = 17, 48, 'bytes'
  pp = 'resize({image_size})|tokenize(max_len={text_len}, tokenizer="{tokenizer}")'
  assert input_pipeline.format_pp(pp, c) == 'resize(48)|tokenize(max_len=17, tokenizer="bytes")'
  assert input_pipeline.format_pp('decode|keep("image")', c) == 'decode|keep("image")'


@pytest.mark.parametrize('pp', ['resize({img_size})', 'tokenize(max_len={0})'])
def test_format_pp_unknown_placeholder_raises(pp):
  with pytest.raises(ValueError, match=r"unknown placeholder.*\['image_size', 'text_len', "
                                       r"'tokenizer'\]"):
    input_pipeline.format_pp(pp, common.base_config())


def test_global_batches_are_sharded_over_the_mesh(shapes_data_dir):
  mesh = mesh_lib.create_mesh([('data', -1)])
  sharding = mesh_lib.batch_sharding(mesh)
  pp, text_len = demo_pp()

  def make_ds():  # A fresh pipeline each time: a reiterated one may reshuffle.
    return input_pipeline.get_dataset(name=DATASET, split='train', pp=pp, batch_size=16,
                                      data_dir=shapes_data_dir, train=True, seed=3,
                                      shuffle_buffer=512).take(2)

  local = list(make_ds().as_numpy_iterator())
  glob = list(input_pipeline.global_batches(make_ds(), sharding))
  assert len(glob) == 2
  for g, l in zip(glob, local):
    assert set(g) == {'image', 'text'}
    for key in g:
      assert isinstance(g[key], jax.Array)
      assert g[key].shape == l[key].shape and g[key].dtype == l[key].dtype
      assert g[key].sharding.is_equivalent_to(sharding, g[key].ndim)
      assert len(g[key].addressable_shards) == 8
      for shard in g[key].addressable_shards:
        assert shard.data.shape[0] == 2  # 16 rows over 8 devices.
        np.testing.assert_array_equal(np.asarray(shard.data), l[key][shard.index])
      np.testing.assert_array_equal(np.asarray(g[key]), l[key])
  assert glob[0]['text'].shape == (16, text_len)
