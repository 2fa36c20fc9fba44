"""Input the sources skip (a truncated shard, an undecodable row, an unreadable file): counted
per reason, and each named in the log (the first few of a reason, then at powers of two, so a
dataset with a million bad rows does not flood it).

One count per process: sources index in the main thread and read in tf.data's threads, and
the training stream's messages and metrics read the totals from here.
"""
import collections
import threading

from absl import logging

_FIRST = 5  # Occurrences of a reason logged one by one before the log thins out.


class SkipLog:
  """Counts of skipped input by reason ('truncated_shard', 'not_utf8', 'unreadable', ...)."""

  def __init__(self):
    self._counts = collections.Counter()
    self._examples = {}
    self._lock = threading.Lock()

  def skip(self, reason: str, where: str, cause) -> None:
    """Counts one skip of `reason` at `where` (file, member or row) because of `cause`."""
    with self._lock:
      self._counts[reason] += 1
      n = self._counts[reason]
      self._examples.setdefault(reason, f'{where}: {cause}')
    if n <= _FIRST or not n & (n - 1):
      logging.warning('Input skipped (%s, %d so far): %s: %s', reason, n, where, cause)

  def counts(self) -> dict[str, int]:
    with self._lock:
      return dict(self._counts)

  def describe(self) -> str:
    """'reason: count (e.g. where: cause); ...', or '' when nothing was skipped."""
    with self._lock:
      return '; '.join(f'{r}: {n} (e.g. {self._examples[r]})'
                       for r, n in sorted(self._counts.items()))


SKIPPED = SkipLog()
