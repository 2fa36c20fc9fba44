"""tf.data input pipelines in big_vision style, and global batches for jax.

TFDS source -> this process's share of the split -> (shuffle, repeat) -> per-example
random seed -> preprocessing string -> batch -> prefetch. `global_batches` turns the
per-process numpy batches into global `jax.Array`s sharded over the mesh's batch axes.
"""
from collections.abc import Iterator
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mmcl.data import preprocess

# Datasets built locally on first use (no download): name -> module with prepare().
_LOCAL_BUILDERS = ('mmcl_shapes',)


def format_pp(pp: str, config) -> str:
  """Fills `{text_len}`, `{image_size}` and `{tokenizer}` in a pp string from the config."""
  values = {k: config.get(k) for k in ('text_len', 'image_size', 'tokenizer')}
  try:
    return pp.format(**values)
  except (KeyError, IndexError) as e:
    raise ValueError(f'pp string {pp!r} has an unknown placeholder {e}; valid: '
                     f'{sorted(values)}') from e


def get_builder(name: str, data_dir: str | None) -> tfds.core.DatasetBuilder:
  """The TFDS builder of `name` ('dataset[/config][:version]'); builds local datasets."""
  if name.split('/')[0].split(':')[0] in _LOCAL_BUILDERS:
    from mmcl.data import shapes  # Registers the builder; pure numpy, builds in seconds.
    config = name.split('/')[1].split(':')[0] if '/' in name else 'default'
    return shapes.prepare(data_dir or _default_data_dir(), config)
  return tfds.builder(name, data_dir=data_dir)


def _default_data_dir() -> str:
  return os.environ.get('TFDS_DATA_DIR', os.path.expanduser('~/tensorflow_datasets'))


def process_split(split: str, process_index: int, process_count: int, train: bool) -> str:
  """This process's share of `split` (a TFDS split expression).

  Training drops the remainder so every process streams equal shares; evaluation keeps
  every example (shares then differ by at most one).
  """
  if process_count == 1:
    return split
  return tfds.even_splits(split, n=process_count, drop_remainder=train)[process_index]


def _decoders(builder):
  """Skip image decoding in TFDS: the pp string's `decode` op does it (and may crop first)."""
  features = builder.info.features
  return {k: tfds.decode.SkipDecoding() for k, f in features.items()
          if isinstance(f, tfds.features.Image)}


def add_seeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
  """Attaches a distinct stateless seed `_seed` (int64[2]) to each example."""
  seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
  return tf.data.Dataset.zip(ds, seeds).map(lambda ex, s: {**ex, '_seed': s})


def get_dataset(*, name: str, split: str, pp: str, batch_size: int, data_dir=None,
                train: bool = True, shuffle_buffer: int = 10_000, seed: int = 0,
                process_index: int = 0, process_count: int = 1,
                cache: bool = False) -> tf.data.Dataset:
  """Per-process batches of `batch_size // process_count` preprocessed examples.

  For training the stream repeats forever, shuffled; for evaluation it is one ordered
  pass and the last batch is kept (smaller), so every example is seen exactly once.
  """
  if batch_size % process_count:
    raise ValueError(f'Batch size {batch_size} does not divide over {process_count} processes.')
  pp_fn = preprocess.get_preprocess_fn(pp)  # Validates the pp string before any I/O.
  builder = get_builder(name, data_dir)
  local_split = process_split(split, process_index, process_count, train)
  read_config = tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True)
  ds = builder.as_dataset(split=local_split, shuffle_files=train, decoders=_decoders(builder),
                          read_config=read_config)
  if cache:
    ds = ds.cache()
  if train:
    ds = ds.repeat().shuffle(shuffle_buffer, seed=seed)
  ds = add_seeds(ds, seed + 1_000_003 * process_index)
  ds = ds.map(pp_fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if train:
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
  else:  # Keeps variable-length features (e.g. several captions per image) as ragged.
    ds = ds.ragged_batch(batch_size // process_count)
  return ds.prefetch(tf.data.AUTOTUNE)


def global_batches(ds: tf.data.Dataset, sharding) -> Iterator[dict[str, jax.Array]]:
  """Yields global arrays assembled from this process's batches of `ds`."""
  for local in ds.as_numpy_iterator():
    yield jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
