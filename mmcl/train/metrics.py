"""Metric writers: `workdir/metrics.jsonl` (one JSON object per log step), TensorBoard and,
when a run is given, Weights & Biases.

Only process 0 writes. Values are converted to Python floats, so every line is plain JSON.
Both go through mmcl.fs, so the workdir may be remote (`gs://...`). A remote object cannot
be appended to, only rewritten, so there rows are flushed at most every `flush_secs` and at
every `flush()` (the loop flushes before each checkpoint: rows up to a checkpoint's step are
stored when it is). A torn last line (a run killed mid-write) is dropped on resume, with a
warning naming the file.
"""
import json
import time

from absl import logging
import jax
import numpy as np

from mmcl import fs

FILENAME = 'metrics.jsonl'


class MetricWriter:

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True,
               flush_secs: float = 30.0, wandb_run=None):
    self.enabled = jax.process_index() == 0
    self._wandb = wandb_run  # Rows also go there (mmcl.train.wandb_run).
    self.path = fs.join(workdir, FILENAME)
    self._tb = self._file = None
    self._flush_secs = flush_secs if fs.is_remote(self.path) else 0.0
    self._last_flush = time.monotonic()
    if self.enabled:
      fs.makedirs(workdir)
      self._truncate_after(resume_step)
      self._file = fs.open(self.path, 'a')
      if tensorboard:
        from tensorboardX import SummaryWriter  # Only process 0 pays for the import.
        _register_tensorboard_schemes()
        self._tb = SummaryWriter(fs.join(workdir, 'tb'))

  def _truncate_after(self, step: int):
    """Drops rows logged after the checkpoint we resume from (those steps run again) and
    a torn last line; the file is replaced atomically, so a crash here loses nothing."""
    rows, intact = _read(self.path)
    kept = [r for r in rows if r['step'] <= step]
    if len(kept) != len(rows) or not intact:
      fs.write_text_atomic(self.path, ''.join(json.dumps(r) + '\n' for r in kept))

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
    self._file.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step':
          self._tb.add_scalar(k, v, int(step))
    if self._wandb is not None:
      # W&B ignores (with a warning) a step it has: the rows a resumed run logs again.
      self._wandb.log({k: v for k, v in row.items() if k != 'step'}, step=int(step))
    if time.monotonic() - self._last_flush >= self._flush_secs:
      self.flush()

  def flush(self):
    if self._file is not None:
      self._file.flush()
    if self._tb is not None:
      self._tb.flush()
    self._last_flush = time.monotonic()

  def close(self):
    if self._file is not None:
      self._file.close()
      self._file = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None


def read_metrics(workdir: str) -> list[dict]:
  """The rows of `workdir/metrics.jsonl` ([] if there is none); a torn last line is skipped
  with a warning, any other line that is not JSON is an error naming the file and line."""
  return read_metrics_file(fs.join(workdir, FILENAME))


def read_metrics_file(path: str) -> list[dict]:
  """`read_metrics` of a .jsonl file (local or remote)."""
  return _read(path)[0]


def _read(path: str) -> tuple[list[dict], bool]:
  """(rows, whether the file ends cleanly: False when its last line is torn)."""
  if not fs.exists(path):
    return [], True
  text = fs.read_text(path)
  lines = text.split('\n')  # After the final newline: '' (or the torn tail).
  rows = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      rows.append(json.loads(line))
    except json.JSONDecodeError as e:
      if number == len(lines):  # The unfinished last write of a killed run.
        logging.warning('%s: dropped its torn last line %d (%d bytes, %r...): the run '
                        'writing it was stopped mid-write.', path, number, len(line),
                        line[:40])
        return rows, False
      raise ValueError(f'{path}, line {number} is not JSON ({e.msg}, column {e.colno}): '
                       f'{line[:80]!r}. Fix or delete that line.') from None
  return rows, not lines[-1]  # A complete last row without its newline: rewrite too.


class _FsRecordWriters:
  """tensorboardX event files on remote schemes, through mmcl.fs (its own gs:// writer
  needs google-cloud-storage)."""

  def directory_check(self, path):
    fs.makedirs(path)

  def open(self, path):
    return fs.open(path, 'wb')


def _register_tensorboard_schemes():
  from tensorboardX import record_writer
  for scheme in fs.REMOTE_SCHEMES:
    record_writer.register_writer_factory(scheme, _FsRecordWriters())
