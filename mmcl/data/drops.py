"""What a training stream drops, and the guard that stops one that keeps nothing.

A stream whose every record is dropped (64 px images with `image_size=32`, every file path
wrong) would spin forever inside tf.data's `filter` / `ignore_errors`, where no Python
code runs, so neither an error nor SIGTERM would ever get out. The guard, a `take_while`
before the preprocessing, ends the stream after `limit` records in a row without one kept,
or soon after `interrupt()` (a signal, while the loop waits for input); the consumer then
raises InputStalled with the counts. Counts are tf.Variables updated by tf.data as it reads
(a few batches ahead of the consumer), saved beside the iterator in the data state.
"""
import tensorflow as tf

# Records in a row without one kept after which an interrupted stream ends. A healthy
# stream never gets there (between kept records there are only the few in flight), so
# a signal never ends a stream the loop is still reading; it only wakes a stalled one.
_INTERRUPT_AFTER = 1000


class InputStalled(RuntimeError):
  """A training stream that kept no record: the message names the drop reasons."""


class InputInterrupted(InputStalled):
  """A stream ended by a signal while nothing was being kept (the loop was waiting)."""


class DropCounters:
  """One stream's drop counts and its guard (see the module docstring)."""

  NAMES = ('passed', 'reached', 'misshapen', 'since')

  def __init__(self, limit: int | None):
    self.limit = limit
    var = lambda: tf.Variable(0, dtype=tf.int64, trainable=False)
    # Records past the guard, reaching the shape filter, misshapen there, and since the
    # last kept one (records failing preprocessing = passed - reached, once drained).
    self.passed, self.reached, self.misshapen, self.since = var(), var(), var(), var()
    self.stop = tf.Variable(False, trainable=False)
    self.ended = tf.Variable(False, trainable=False)

  def guard(self, *_) -> tf.Tensor:
    """take_while predicate: count the record, and say whether the stream goes on."""
    since = self.since.assign_add(1)
    ok = since <= self.limit if self.limit else tf.constant(True)
    ok = tf.logical_and(ok, tf.logical_not(
        tf.logical_and(self.stop, since > _INTERRUPT_AFTER)))
    with tf.control_dependencies([self.passed.assign_add(tf.cast(ok, tf.int64)),
                                  self.ended.assign(tf.logical_or(self.ended,
                                                                  tf.logical_not(ok)))]):
      return tf.identity(ok)

  def keep_fn(self, has_shapes):
    """filter predicate: `has_shapes(example)`, counting the misshapen."""
    def keep(ex):
      def kept():
        with tf.control_dependencies([self.since.assign(0)]):
          return tf.constant(True)
      def misshapen():
        with tf.control_dependencies([self.misshapen.assign_add(1)]):
          return tf.constant(False)
      with tf.control_dependencies([self.reached.assign_add(1)]):
        return tf.cond(has_shapes(ex), kept, misshapen)
    return keep

  def interrupt(self):
    """Lets a stalled stream end soon (safe from any thread)."""
    self.stop.assign(True)

  @property
  def interrupted(self) -> bool:
    return bool(self.stop.numpy())

  @property
  def has_ended(self) -> bool:
    return bool(self.ended.numpy())

  def values(self) -> dict[str, int]:
    return {k: int(getattr(self, k).numpy()) for k in self.NAMES}

  def assign(self, values: dict):
    for k in self.NAMES:
      getattr(self, k).assign(values.get(k, 0))

  def describe(self) -> str:
    v = self.values()
    return (f'{v["misshapen"]:,} with the wrong shape, {v["passed"] - v["reached"]:,} that '
            'failed to read, decode or preprocess')
