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

from mmcl.data import preprocess, sources

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


def with_seeds(ds: tf.data.Dataset, seed: int) -> tf.data.Dataset:
  """Pairs each example with a distinct stateless seed (int64[2]) for its random pp ops."""
  seeds = tf.data.Dataset.random(seed=seed).batch(2, drop_remainder=True)
  return tf.data.Dataset.zip(ds, seeds)


def get_dataset(*, name, split: str, pp: str, batch_size: int, data_dir=None,
                train: bool = True, shuffle_buffer: int = 10_000, seed: int = 0,
                process_index: int = 0, process_count: int = 1,
                cache: bool = False, shapes: dict | None = None,
                with_index: bool = False) -> tf.data.Dataset:
  """Per-process batches of `batch_size // process_count` preprocessed examples.

  `name` is a TFDS name, a file source ('wds:...', 'csv:...', see sources.py), or for
  training a weighted mixture ((name, weight), ...). For training the stream repeats
  forever, shuffled; for evaluation it is one ordered
  pass and the last batch is kept (smaller), so every example is seen exactly once.
  (`process_index` / `process_count` may also name one of several data shards a process
  reads, see `ShardedBatches`.)

  A record whose preprocessing fails (e.g. corrupt image bytes), or whose features do not
  have the `shapes` given ({key: shape}), is dropped, never fatal. With `with_index`, each
  example carries `_index`, its position in the stream before dropping, so a consumer can
  count what was dropped.
  """
  if batch_size % process_count:
    raise ValueError(f'Batch size {batch_size} does not divide over {process_count} processes.')
  pp_fn = preprocess.get_preprocess_fn(pp)  # Validates the pp string before any I/O.
  def source(source_name):
    if sources.is_file_source(source_name):
      ds = sources.file_dataset(source_name, process_index, process_count)
    else:
      builder = get_builder(source_name, data_dir)
      ds = builder.as_dataset(
          split=process_split(split, process_index, process_count, train),
          shuffle_files=train, decoders=_decoders(builder),
          read_config=tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True))
    if cache:
      ds = ds.cache()
    return ds.repeat().shuffle(shuffle_buffer, seed=seed) if train else ds

  if isinstance(name, str):
    ds = source(name)
  else:  # A weighted mixture: ((name, weight), ...), for training.
    if not train:
      raise ValueError(f'A mixture of sources {name} is for training; evaluate each alone.')
    members = [source(n) for n, _ in name]
    common = set.intersection(*(set(m.element_spec) for m in members))
    members = [m.map(lambda ex: {k: v for k, v in ex.items() if k in common})
               for m in members]
    ds = tf.data.Dataset.sample_from_datasets(
        members, weights=[float(w) for _, w in name], seed=seed)
  # The seed joins the example inside the one parallel map: every extra per-example op
  # (a sequential map, an enumerate) costs the pipeline ~10% (BENCHMARKS.md section 3).
  ds = with_seeds(ds, seed + 1_000_003 * process_index)
  process = lambda ex, s: pp_fn({**ex, '_seed': s})
  if with_index:
    ds = ds.enumerate().map(lambda i, ex_s: {**process(*ex_s), '_index': i},
                            num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors()  # Records that fail to decode or preprocess are dropped.
  if shapes:
    ds = ds.filter(lambda ex: _has_shapes(ex, shapes))
  if train:
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
  else:  # Keeps variable-length features (e.g. several captions per image) as ragged.
    ds = ds.ragged_batch(batch_size // process_count)
  return ds.prefetch(tf.data.AUTOTUNE)


def _has_shapes(example: dict, shapes: dict) -> tf.Tensor:
  ok = tf.constant(True)
  for key, shape in shapes.items():
    if example[key].shape.rank != len(shape):
      return tf.constant(False)
    got = tf.shape(example[key])
    ok = tf.logical_and(ok, tf.reduce_all(tf.equal(got, tf.constant(shape, got.dtype))))
  return ok


class ShardedBatches:
  """Global training batches from several data shards, with a saveable exact position.

  The split is cut into `num_shards` shards, each with its own tf.data pipeline (own
  shuffle and random seeds); the global batch is the concatenation of one batch from every
  shard, in shard order. A process reads the shards `shard_ids` and assembles the global
  jax.Array from its local rows. The stream depends on the number of shards, not on the
  number of processes, so runs with 1 and with N processes see the same batches, and the
  per-shard iterator states saved in a checkpoint resume under any process count that
  divides the number of shards.
  """

  def __init__(self, make_dataset, shard_ids, num_shards: int, sharding):
    self.shard_ids, self.num_shards, self.sharding = list(shard_ids), num_shards, sharding
    self._iters = [iter(make_dataset(i)) for i in self.shard_ids]
    # Examples emitted per shard; with the last `_index` seen this gives the dropped count.
    self._emitted = [tf.Variable(0, dtype=tf.int64) for _ in self.shard_ids]
    self._last = [tf.Variable(-1, dtype=tf.int64) for _ in self.shard_ids]
    self._ckpts = [tf.train.Checkpoint(iterator=it, emitted=e, last=l)
                   for it, e, l in zip(self._iters, self._emitted, self._last)]

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    parts = []
    for it, emitted, last in zip(self._iters, self._emitted, self._last):
      batch = next(it)
      index = batch.pop('_index').numpy()
      emitted.assign_add(len(index))
      last.assign(int(index[-1]))
      parts.append({k: v.numpy() for k, v in batch.items()})
    local = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.sharding, x), local)

  @property
  def dropped(self) -> int:
    """Records this process dropped so far (failed preprocessing or wrong shape)."""
    return sum(int(l.numpy()) + 1 - int(e.numpy()) for l, e in zip(self._last, self._emitted))

  def save(self, directory: str):
    """Writes each shard's iterator state to `directory/shard_<i>` (blocking)."""
    for i, ckpt in zip(self.shard_ids, self._ckpts):
      ckpt.write(os.path.join(directory, f'shard_{i}', 'state'))

  def restore(self, directory: str):
    saved = sorted(n for n in os.listdir(directory) if n.startswith('shard_'))
    if len(saved) != self.num_shards:
      raise ValueError(
          f'The data state in {directory} has shards {saved}, but this run reads '
          f'{self.num_shards} shards ({self.shard_ids} in this process): set '
          f'config.input.shards to the number the run was started with.')
    for i, ckpt in zip(self.shard_ids, self._ckpts):
      ckpt.read(os.path.join(directory, f'shard_{i}', 'state')).assert_consumed()


def global_batches(ds: tf.data.Dataset, sharding) -> Iterator[dict[str, jax.Array]]:
  """Yields global arrays assembled from this process's batches of `ds`."""
  for local in ds.as_numpy_iterator():
    yield jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
