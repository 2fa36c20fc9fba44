"""The training log: progress bar and periodic train metrics, read one step late.

Every `config.log_every` steps a row goes to metrics.jsonl and TensorBoard (and W&B when
on) with, beside the step's own metrics:
  train/steps_per_sec, train/examples_per_sec   over the interval since the last row
  train/flops_per_sec_per_device, train/mfu      the compiled step's FLOPs (cost_analysis)
                      over the interval's training time, against the device's peak
                      (mmcl.train.throughput.device_peak: chip table, or measured on CPU)
  train/time/{input,compute,other}_fraction, train/time/input_sec_per_batch and
  train/time/compute_sec_per_step:
                      the interval's wall time split into waiting for the next batch, the
                      rest of the step (dispatch, and waiting for the device when the host
                      gets ahead), and evaluations and checkpoints (`other`)
  memory/bytes_in_use, memory/peak_bytes_in_use  the largest over this process's devices,
                      where the backend reports them (not on CPU: said once, not logged)
  data/...            records read, dropped (by reason) and per data shard, records the
                      pipeline holds read ahead (its queue), input skipped by the sources
Every step's skip counter is read (one step late): after `config.max_skipped_steps`
consecutive non-finite updates the run stops, naming the step and the offending values.
"""
import time

import jax
import numpy as np

from mmcl.data import skipped
from mmcl.train import throughput


class TrainLogger:

  def __init__(self, config, writer, start: int, batches, *, step_flops: float = 0.0,
               peak: tuple[float, str] | None = None):
    self.config, self.writer, self.batches = config, writer, batches
    self.step_flops = step_flops  # One step on one device.
    self.peak, peak_source = peak or (0.0, 'none')
    self.devices = jax.local_devices()
    self.pending = None
    self.t_last, self.step_last = time.perf_counter(), start
    self.input_secs = self.other_secs = 0.0
    self.fetches = 0  # Batches waited for in this interval.
    self.has_memory = throughput.memory_stats(self.devices) is not None
    self.bar = None
    if jax.process_index() == 0:
      print(f'Step FLOPs per device {step_flops:.3g} (compiled cost analysis); peak '
            f'{self.peak:.3g} FLOP/s per device: {peak_source}.', flush=True)
      if not self.has_memory:
        print(f'Device memory: the {self.devices[0].platform} backend reports none '
              '(device.memory_stats()), so memory/* is not logged.', flush=True)
    if config.progress_bar and jax.process_index() == 0:
      from tqdm import tqdm
      self.bar = tqdm(total=config.total_steps, initial=start, desc='train', dynamic_ncols=True)

  def dispatched(self, step: int, metrics, input_secs: float = 0.0):
    """`step` is in flight (its batch took `input_secs` to arrive): log step-1's metrics."""
    self.input_secs += input_secs
    self.fetches += 1
    if self.pending is not None:
      self._log(*self.pending)
    self.pending = (step, metrics)

  def outside(self, secs: float):
    """Time spent on evaluations and checkpoints, not on training steps."""
    self.other_secs += secs

  def close(self):
    if self.pending is not None:
      self._log(*self.pending)
      self.pending = None
    if self.bar is not None:
      self.bar.close()
      self.bar = None

  def _log(self, step, metrics):
    if self.bar is not None:
      self.bar.update(1)
    in_a_row = int(metrics['train/skipped_in_a_row'])
    if in_a_row >= self.config.get('max_skipped_steps', 10):
      values = {k: float(metrics[k]) for k in ('train/loss', 'train/total_loss',
                                                'train/grad_norm')}
      raise FloatingPointError(
          f'{in_a_row} consecutive updates skipped for non-finite values, the last at step '
          f'{step}: {values}. Stopping (config.max_skipped_steps).')
    if step % self.config.log_every and step != self.config.total_steps:
      return
    metrics = jax.device_get(metrics)
    metrics.update(self._timing(step))
    metrics.update(self._data())
    if self.has_memory:
      metrics.update({f'memory/{k}': v
                      for k, v in throughput.memory_stats(self.devices).items()})
    self.writer.write(step, metrics)
    if self.bar is not None:
      self.bar.set_postfix(loss=f'{float(metrics["train/loss"]):.3f}',
                           ex_s=f'{metrics["train/examples_per_sec"]:.1f}',
                           mfu=f'{metrics.get("train/mfu", 0):.1%}',
                           input=f'{metrics["train/time/input_fraction"]:.0%}', refresh=False)

  def _timing(self, step) -> dict:
    now = time.perf_counter()
    steps, wall = step - self.step_last, max(now - self.t_last, 1e-9)
    train = max(wall - self.other_secs, 1e-9)
    compute = max(train - self.input_secs, 0.0)
    out = {'train/steps_per_sec': steps / wall,
           'train/examples_per_sec': steps / wall * self.config.batch_size,
           'train/time/input_fraction': self.input_secs / wall,
           'train/time/compute_fraction': compute / wall,
           'train/time/other_fraction': min(self.other_secs / wall, 1.0),
           'train/time/input_sec_per_batch': self.input_secs / max(self.fetches, 1),
           'train/time/compute_sec_per_step': compute / max(steps, 1)}
    if self.step_flops:
      out['train/flops_per_sec_per_device'] = self.step_flops * steps / train
      if self.peak:
        out['train/mfu'] = out['train/flops_per_sec_per_device'] / self.peak
    self.t_last, self.step_last = now, step
    self.input_secs = self.other_secs = 0.0
    self.fetches = 0
    return out

  def _data(self) -> dict:
    """Input health, summed over processes: drops by reason, per data shard, read-ahead."""
    b = self.batches
    drops = b.drop_counts()  # By reason: 'misshapen', 'failed'.
    total, *by_reason = _all_processes_sum([b.dropped, *drops.values()])
    out = {'data/dropped_records': total}
    out.update({f'data/dropped/{k}': v for k, v in zip(drops, by_reason)})
    # Every process reads as many shards: rows of (shard id, read, dropped, queued).
    local = [v for shard, c in b.shard_counts().items()
             for v in (shard, c['read'], c['dropped'], c['queued'])]
    for row in _all_processes_gather(local).reshape(-1, 4):
      shard, counts = int(row[0]), dict(zip(('read', 'dropped', 'queued'), row[1:]))
      out.update({f'data/shard{shard}/{k}_records': int(v) for k, v in counts.items()})
    for k in ('read', 'queued'):
      out[f'data/{k}_records'] = sum(v for name, v in out.items()
                                     if name.startswith('data/shard') and
                                     name.endswith(f'/{k}_records'))
    out.update({f'data/skipped/{k}': v for k, v in skipped.SKIPPED.counts().items()})
    return out  # (Skips are this process's: the sources count them per process.)


def _all_processes_sum(values: list[int]) -> list[int]:
  return [int(v) for v in np.sum(_all_processes_gather(values), axis=0)]


def _all_processes_gather(values: list[int]) -> np.ndarray:
  """[process, len(values)]: every process's `values` (the same length everywhere)."""
  if jax.process_count() == 1:
    return np.asarray([values], np.int64).reshape(1, len(values))
  from jax.experimental import multihost_utils
  gathered = multihost_utils.process_allgather(np.asarray(values, np.int64))
  return np.asarray(gathered).reshape(-1, len(values))
