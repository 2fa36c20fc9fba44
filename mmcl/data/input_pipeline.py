"""tf.data input pipelines in big_vision style, and global batches for jax.

TFDS source -> this process's share of the split -> (shuffle, repeat) -> per-example
random seed -> preprocessing string -> batch -> prefetch. `global_batches` turns the
per-process numpy batches into global `jax.Array`s sharded over the mesh's batch axes.
"""
from collections.abc import Iterator
import os

from absl import logging
import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from mmcl import fs
from mmcl.data import data_state, drops, preprocess, skipped, sources
from mmcl.data import decoder_tasks  # noqa: F401  (registers the pp op decoder_tasks)

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
                with_index: bool = False,
                max_dropped_in_a_row: int | None = None,
                source_options: dict | None = None) -> tf.data.Dataset:
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
  count what was dropped, the dataset has `drop_counters` (DropCounters), and after
  `max_dropped_in_a_row` records in a row without one kept the stream ends (a training
  stream that drops everything would otherwise spin forever, deaf to signals).
  `source_options` go to file sources (separator, column names, label: sources.options).
  """
  if batch_size % process_count:
    raise ValueError(f'Batch size {batch_size} does not divide over {process_count} processes.')
  pp_fn = preprocess.get_preprocess_fn(pp)  # Validates the pp string before any I/O.
  def source(source_name):
    read = None  # File sources index rows (file, offsets) and read them with `read`.
    if sources.is_file_source(source_name):
      ds, read = sources.file_source(source_name, process_index, process_count,
                                     source_options)
    else:
      sources.check_name(source_name)
      builder = get_builder(source_name, data_dir)
      # No TFDS auto-cache: a small dataset's cache lives in the iterator, and so was in
      # every saved data state (the whole split: 196 MB for configs/limoe_demo.py).
      ds = builder.as_dataset(
          split=process_split(split, process_index, process_count, train),
          shuffle_files=train, decoders=_decoders(builder),
          read_config=tfds.ReadConfig(shuffle_seed=seed, skip_prefetch=True,
                                      try_autocache=False))
    if read is not None and (cache or not train):
      ds, read = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True), None
    if cache:
      ds = ds.cache()
    if train:
      ds = ds.repeat().shuffle(shuffle_buffer, seed=seed)
    if read is not None:  # After the shuffle: its buffer holds rows, not image bytes.
      ds = ds.map(read, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds

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
  counters = None
  if with_index:
    counters = drops.DropCounters(max_dropped_in_a_row)
    ds = ds.enumerate().take_while(counters.guard)
    ds = ds.map(lambda i, ex_s: {**process(*ex_s), '_index': i},
                num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  else:
    ds = ds.map(process, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = ds.ignore_errors()  # Records that fail to read, decode or preprocess are dropped.
  if counters is not None:
    ds = ds.filter(counters.keep_fn(
        lambda ex: _has_shapes(ex, shapes) if shapes else tf.constant(True)))
  elif shapes:
    ds = ds.filter(lambda ex: _has_shapes(ex, shapes))
  if train:
    ds = ds.batch(batch_size // process_count, drop_remainder=True)
  else:  # Keeps variable-length features (e.g. several captions per image) as ragged.
    ds = ds.ragged_batch(batch_size // process_count)
  ds = ds.prefetch(tf.data.AUTOTUNE)
  if counters is not None:
    options = tf.data.Options()
    # The counters are variables outside the iterator: saved beside it (ShardedBatches).
    options.experimental_external_state_policy = (
        tf.data.experimental.ExternalStatePolicy.IGNORE)
    ds = ds.with_options(options)
    ds.drop_counters = counters
  return ds


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

  def __init__(self, make_dataset, shard_ids, num_shards: int, sharding,
               stall_hint: str = ''):
    self.shard_ids, self.num_shards, self.sharding = list(shard_ids), num_shards, sharding
    self.stall_hint = stall_hint  # What to check when a stream keeps nothing.
    datasets = [make_dataset(i) for i in self.shard_ids]
    self._counters = [getattr(ds, 'drop_counters', None) for ds in datasets]
    self._iters = [iter(ds) for ds in datasets]
    # Examples emitted per shard; with the last `_index` seen this gives the dropped count.
    self._emitted = [0] * len(self.shard_ids)
    self._last = [-1] * len(self.shard_ids)
    self._writer = None

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, jax.Array]:
    parts = []
    for k, it in enumerate(self._iters):
      try:
        batch = next(it)
      except StopIteration:  # A training stream repeats: it ends only when it keeps nothing.
        c = self._counters[k]
        error = drops.InputInterrupted if c and c.interrupted else drops.InputStalled
        raise error(self._stalled(k)) from None
      index = batch.pop('_index').numpy()
      self._emitted[k] += len(index)
      self._last[k] = int(index[-1])
      parts.append({key: v.numpy() for key, v in batch.items()})
    local = jax.tree.map(lambda *xs: np.concatenate(xs), *parts)
    return jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(self.sharding, x), local)

  def _stalled(self, k: int) -> str:
    c = self._counters[k]
    if c is None:
      return f'The training stream of data shard {self.shard_ids[k]} ended.'
    if c.interrupted:
      what = 'was interrupted by a signal while it kept nothing'
    elif c.limit and c.values()['since'] > c.limit:
      what = f'kept no record in {c.limit:,} in a row (config.input.max_dropped_in_a_row)'
    else:
      what = 'ended'
    return (f'The training stream of data shard {self.shard_ids[k]} {what}, after '
            f'{self._emitted[k]:,} kept records; dropped: {c.describe()}; skipped by the '
            f'sources: {skipped.SKIPPED.describe() or "none"}. {self.stall_hint}')

  def interrupt(self):
    """Wakes a `next` that waits on streams keeping nothing (callable from any thread,
    e.g. on SIGTERM); a stream that keeps records goes on."""
    for c in self._counters:
      if c is not None:
        c.interrupt()

  @property
  def dropped(self) -> int:
    """Records this process dropped so far (failed preprocessing or wrong shape)."""
    return sum(l + 1 - e for l, e in zip(self._last, self._emitted))

  def drop_counts(self) -> dict[str, int]:
    """This process's drops by reason: 'misshapen' as counted by the pipeline (which reads
    a few batches ahead), 'failed' (to read, decode or preprocess) the rest of `dropped`."""
    misshapen = sum(c.values()['misshapen'] for c in self._counters if c)
    return {'misshapen': misshapen, 'failed': max(0, self.dropped - misshapen)}

  def shard_counts(self) -> dict[int, dict[str, int]]:
    """Per data shard of this process: records 'read' from its source up to the last
    batch taken, of them 'dropped', and 'queued': read by the pipeline beyond that (in its
    preprocessing and prefetch buffers; 0 without drop counters)."""
    out = {}
    for k, shard in enumerate(self.shard_ids):
      read, c = self._last[k] + 1, self._counters[k]
      out[shard] = dict(read=read, dropped=read - self._emitted[k],
                        queued=max(0, c.values()['passed'] - read) if c else 0)
    return out

  def save(self, directory: str):
    """Writes each shard's position to `directory/shard_<i>/state` (blocking)."""
    self.save_async(directory)
    self.wait()

  def save_async(self, directory: str):
    """Starts `save`: the iterators are snapshotted now (they may move on), then encoded
    and written by a thread; `wait` joins it."""
    self.wait()
    if any(c is not None and c.has_ended for c in self._counters):
      # An ended stream (interrupted) would restore as ended: better none (reseeded).
      logging.warning('Data state %s not written: the input stream was interrupted.',
                      directory)
      return
    items = []
    for k, (i, it) in enumerate(zip(self.shard_ids, self._iters)):
      counters = self._counters[k].values() if self._counters[k] else {}
      items.append((data_state.shard_path(directory, i), data_state.snapshot(it),
                    dict(emitted=self._emitted[k], last=self._last[k], counters=counters)))
    self._writer = data_state.Writer(items)

  def wait(self):
    """Waits for the data state being written; raises its error."""
    writer, self._writer = self._writer, None
    if writer is not None:
      writer.join()

  def restore(self, directory: str):
    """Moves every shard to its saved position; DataStateError if a file is damaged."""
    saved = [n for n in fs.listdir(directory) if n.startswith('shard_')]
    if len(saved) != self.num_shards:
      raise ValueError(
          f'The data state in {directory} has shards {saved}, but this run reads '
          f'{self.num_shards} shards ({self.shard_ids} in this process): set '
          f'config.input.shards to the number the run was started with.')
    for k, (i, it) in enumerate(zip(self.shard_ids, self._iters)):
      path = data_state.shard_path(directory, i)
      state, header = data_state.read(path)
      data_state.restore(it, state, path)
      self._emitted[k], self._last[k] = header['emitted'], header['last']
      if self._counters[k]:
        self._counters[k].assign(header['counters'])


def global_batches(ds: tf.data.Dataset, sharding) -> Iterator[dict[str, jax.Array]]:
  """Yields global arrays assembled from this process's batches of `ds`."""
  for local in ds.as_numpy_iterator():
    yield jax.tree.map(
        lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local)
