"""The saved position of a training stream: one file per data shard, `shard_<i>/state`.

A file is a JSON header line (format, payload size, CRC-32, the shard's drop counters) and
the serialized tf.data iterator state. That state is what exact resume needs: the shuffle
buffer (encoded records from TFDS; only file offsets for `wds:`/`csv:` sources, which
shuffle rows before reading) and the examples already decoded ahead (prefetch). The
iterator is serialized at the step (in memory, a snapshot), then encoded and written by a
thread, atomically (a temporary file renamed), through mmcl.fs (local or gs://). A file
that is truncated, damaged or does not fit the pipeline is a `DataStateError` naming the
file and the cause.
"""
import json
import threading
import zlib

import tensorflow as tf

from mmcl import fs

FORMAT = 'mmcl-data-state-1'


class DataStateError(RuntimeError):
  """A data state that cannot be used: unreadable, truncated, damaged or of another pipeline."""


def shard_path(directory: str, shard: int) -> str:
  return fs.join(directory, f'shard_{shard}', 'state')


def snapshot(iterator) -> tf.Tensor:
  """The iterator's state now (a variant tensor; the iterator may move on)."""
  # The hook tf.train.Checkpoint itself calls on a tf.data iterator.
  return iterator._serialize_to_tensors()['_STATE']  # pylint: disable=protected-access


def restore(iterator, state: tf.Tensor, path: str):
  try:
    iterator._restore_from_tensors({'_STATE': state})  # pylint: disable=protected-access
  except (tf.errors.OpError, ValueError) as e:
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise DataStateError(f'{path} does not fit this input pipeline (config.input changed '
                         f'since it was saved?): {first}') from e


class Writer:
  """Writes [(path, state, counters)] in a thread; `join` waits and re-raises its error."""

  def __init__(self, items):
    self._error = None
    self._thread = threading.Thread(target=self._write, args=(items,), daemon=True,
                                    name='mmcl-data-state')
    self._thread.start()

  def _write(self, items):
    try:
      for path, state, counters in items:
        payload = tf.io.serialize_tensor(state).numpy()
        header = dict(format=FORMAT, bytes=len(payload), crc32=zlib.crc32(payload),
                      **counters)
        tmp = path + '.tmp'
        with fs.open(tmp, 'wb') as f:
          f.write(json.dumps(header).encode() + b'\n')
          f.write(payload)
        fs.rename(tmp, path)  # A crash leaves the old file or the new one, never half.
    except BaseException as e:  # pylint: disable=broad-except  (re-raised by join)
      self._error = e

  def join(self):
    self._thread.join()
    if self._error is not None:
      raise self._error


def read(path: str) -> tuple[tf.Tensor, dict]:
  """(state, header) of one shard's file, or a DataStateError saying what is wrong."""
  if not fs.exists(path) and fs.exists(path + '.index'):
    raise DataStateError(f'{path}: written by an older mmcl (tf.train.Checkpoint format), '
                         'which this pipeline cannot restore.')
  try:
    with fs.open(path, 'rb') as f:
      header = json.loads(f.readline())
      payload = f.read()
  except (OSError, ValueError, tf.errors.OpError) as e:
    raise DataStateError(f'{path} cannot be read: {type(e).__name__}: {e}') from e
  if not isinstance(header, dict) or header.get('format') != FORMAT:
    raise DataStateError(f'{path} is not an mmcl data state (no {FORMAT!r} header).')
  if len(payload) != header['bytes']:
    raise DataStateError(f'{path} is truncated: {len(payload):,} of {header["bytes"]:,} '
                         'bytes.')
  if zlib.crc32(payload) != header['crc32']:
    raise DataStateError(f'{path} is damaged: its CRC-32 does not match its header.')
  try:
    return tf.io.parse_tensor(payload, tf.variant), header
  except tf.errors.OpError as e:
    raise DataStateError(f'{path} cannot be decoded: {e.message}') from e
