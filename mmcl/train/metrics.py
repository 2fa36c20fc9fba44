"""Metric writers: `workdir/metrics.jsonl` (one JSON object per log step) and TensorBoard.

Only process 0 writes. Values are converted to Python floats, so every line is plain JSON.
"""
import json
import os

import jax
import numpy as np


class MetricWriter:

  def __init__(self, workdir: str, *, resume_step: int = 0, tensorboard: bool = True):
    self.enabled = jax.process_index() == 0
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self._tb = None
    if self.enabled:
      os.makedirs(workdir, exist_ok=True)
      self._truncate_after(resume_step)
      if tensorboard:
        from tensorboardX import SummaryWriter  # Only process 0 pays for the import.
        self._tb = SummaryWriter(os.path.join(workdir, 'tb'))

  def _truncate_after(self, step: int):
    """Drops rows logged after the checkpoint we resume from: those steps run again."""
    rows = read_metrics(os.path.dirname(self.path))
    kept = [r for r in rows if r['step'] <= step]
    if len(kept) != len(rows):
      tmp = self.path + '.tmp'
      with open(tmp, 'w') as f:
        f.writelines(json.dumps(r) + '\n' for r in kept)
      os.replace(tmp, self.path)  # Atomic: a crash here never loses the old file.

  def write(self, step: int, metrics: dict):
    if not self.enabled:
      return
    row = {'step': int(step)}
    row.update({k: float(np.asarray(v)) for k, v in metrics.items()})
    with open(self.path, 'a') as f:
      f.write(json.dumps(row) + '\n')
    if self._tb is not None:
      for k, v in row.items():
        if k != 'step':
          self._tb.add_scalar(k, v, int(step))
      self._tb.flush()

  def close(self):
    if self._tb is not None:
      self._tb.close()


def read_metrics(workdir: str) -> list[dict]:
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
