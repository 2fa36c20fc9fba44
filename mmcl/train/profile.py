"""jax.profiler traces of a few train steps, and where their time went (per-op summary).

`trace(run_steps, directory)` writes a trace in the layout TensorBoard's profile plugin
reads (`<directory>/plugins/profile/<run>/<host>.xplane.pb`, plus a `.trace.json.gz` that
Perfetto opens); `op_summary(directory, compiled)` sums the step's op times from it: HLO op
kind and the model code (op_name) that made each op. tools/bench_step.py --trace and the
training loop's `config.profile` windows (`ProfileWindows`) both use these.
"""
import collections
import glob
import gzip
import json
import os
import re
import sys
import time

import jax

from mmcl import fs


def trace(run_steps, directory: str):
  """Runs `run_steps()` (which must block until its steps are done) under jax.profiler."""
  with jax.profiler.trace(directory):
    run_steps()


def newest_run(directory: str) -> str:
  """The newest `plugins/profile/<run>` folder of a trace directory."""
  runs = sorted(glob.glob(os.path.join(directory, 'plugins', 'profile', '*', '')))
  if not runs:
    raise FileNotFoundError(f'No jax.profiler trace under {directory}/plugins/profile.')
  return runs[-1].rstrip('/')


def op_summary(directory: str, compiled, steps: int = 1) -> tuple[float, list]:
  """(op microseconds per step, [(what, microseconds per step), ...] biggest first) of the
  newest trace in `directory`: thread time of `compiled`'s ops (other executables, the
  runtime and Python are left out), by op kind and the model code that made the op."""
  hlo = compiled.as_text()
  module = re.search(r'HloModule ([^\s,]+)', hlo).group(1)
  made_by = dict(re.findall(r'%(\S+) = [^\n]*?op_name="([^"]*)"', hlo))
  paths = glob.glob(os.path.join(newest_run(directory), '*.trace.json.gz'))
  if not paths:
    raise FileNotFoundError(f'No .trace.json.gz in {newest_run(directory)}.')
  totals = collections.Counter()
  for e in json.load(gzip.open(paths[0]))['traceEvents']:
    args = e.get('args', {})
    if e.get('ph') != 'X' or 'hlo_op' not in args or args.get('hlo_module') != module:
      continue
    op = args['hlo_op']
    code = re.sub(r'encoderblock_\d+', 'encoderblock_*',
                  made_by.get(op, '').replace('jit(train_step)/', ''))
    kind = re.sub(r'[.]\d+$', '', op)
    totals[f'{kind}  {code}'] += e['dur'] / steps
  return sum(totals.values()), totals.most_common()


def format_op_summary(total_us: float, ops: list, directory: str, top: int = 25) -> str:
  lines = [f'{total_us / 1e3:.0f} ms of op time per step (threads summed); trace in {directory}']
  lines += [f'{us / 1e3:9.1f} ms {us / max(total_us, 1e-9):6.1%}  {what}'
            for what, us in ops[:top]]
  return '\n'.join(lines)


def print_op_summary(directory: str, compiled, steps: int = 1, top: int = 25, file=None):
  total, ops = op_summary(directory, compiled, steps)
  print(format_op_summary(total, ops, directory, top), file=file or sys.stderr, flush=True)


class ProfileWindows:
  """`config.profile`: traces of `num_steps` steps starting at each of `steps`, written to
  `<workdir>/tb` (beside the TensorBoard scalars, so one `tensorboard --logdir` shows both),
  by process 0 or, with processes='all', by every process; the op summary is printed.

  The loop calls `before(step)` before dispatching a step and `after(step, outputs)` after;
  the window's last step is waited for, so the trace holds its device work.
  """
  PROCESSES = ('first', 'all')

  def __init__(self, profile, workdir: str, compiled):
    profile = profile or {}
    self.steps = tuple(int(s) for s in profile.get('steps', ()) or ())
    self.num_steps = int(profile.get('num_steps', 3))
    processes = profile.get('processes', 'first')
    if processes not in self.PROCESSES:
      raise ValueError(f'config.profile.processes={processes!r}; valid: {self.PROCESSES}.')
    if self.steps and self.num_steps < 1:
      raise ValueError(f'config.profile.num_steps={self.num_steps} must be >= 1.')
    if processes == 'first' and jax.process_index() != 0:
      self.steps = ()
    self.directory = fs.join(workdir, 'tb')
    self.compiled = compiled
    self._end = None

  def before(self, step: int):
    if step in self.steps and self._end is None:
      jax.profiler.start_trace(self.directory)
      self._end = step + self.num_steps - 1

  def after(self, step: int, outputs, last_step: int) -> float:
    """Ends a window at its last step; returns the seconds spent writing and summarising
    the trace (not training time)."""
    if self._end is None or step < min(self._end, last_step):
      return 0.0
    jax.block_until_ready(outputs)
    start = time.perf_counter()
    jax.profiler.stop_trace()
    steps = self.num_steps - max(0, self._end - last_step)
    self._end = None
    print(f'Profile of steps {step - steps + 1}..{step}:', flush=True)
    print_op_summary(self.directory, self.compiled, steps, file=sys.stdout)
    return time.perf_counter() - start

  def close(self):
    """Ends a window cut short (preemption, an error)."""
    if self._end is not None:
      self._end = None
      jax.profiler.stop_trace()
