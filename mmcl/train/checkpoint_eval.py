"""Evaluates a saved checkpoint with the evaluators of `config.evals` (tools/eval.py).

Only the parameters are restored, straight into their training shardings; then every
evaluator runs once. Results go to `<out_dir>/metrics.jsonl` and TensorBoard (process
0 only), apart from the training run's own metrics.jsonl so nothing there is rewritten.

It lives in mmcl/train because it needs the train state's layout (`loop.setup`); mmcl.evaluate
knows nothing of training.

`evaluate_steps(..., steps='all')` sweeps every checkpoint of a run with one setup and one
set of evaluators; `format_steps_table` and `plot_steps` show every metric across them.
"""
import posixpath
import sys

import jax
import orbax.checkpoint as ocp

from mmcl import checkpoint as checkpoint_lib
from mmcl import evaluate, fs, tree
from mmcl.train import ema as ema_lib
from mmcl.train import loop
from mmcl.train import metrics as metrics_lib
from mmcl.train import plots, report


def resolve_checkpoint(workdir: str | None, checkpoint: str | None) -> tuple[str, int | None]:
  """(workdir holding ckpt/, step or None = latest) from --workdir or --checkpoint."""
  if (workdir is None) == (checkpoint is None):
    raise ValueError('Give exactly one of --workdir (latest checkpoint) or --checkpoint '
                     f'(a <workdir>/ckpt/<step> directory); got workdir={workdir!r}, '
                     f'checkpoint={checkpoint!r}.')
  if workdir is not None:
    return workdir, None
  path = fs.join(checkpoint.rstrip('/'))  # Local (made absolute) or gs://...
  parent, step = posixpath.split(path)
  if not step.isdigit() or posixpath.basename(parent) != 'ckpt' or not fs.isdir(path):
    raise ValueError(f'--checkpoint={checkpoint!r} is not a <workdir>/ckpt/<step> directory '
                     'written by mmcl.')
  return posixpath.dirname(parent), int(step)


class RunCheckpoints:
  """The parameters of any saved step of a run, one `setup` for all of them.

  Only the parameters are read (orbax partial restore), straight into the shardings the
  train loop's own setup gives them: no optimizer state is read or allocated. With
  config.ema.eval the EMA weights are read instead (state['ema'], mmcl/train/ema.py).
  """

  def __init__(self, config, workdir: str):
    s = loop.setup(config)
    self.model, self.mesh, self._abstract_state = s.model, s.mesh, s.abstract_state
    self._key = ema_lib.eval_key(config)
    self._target = {self._key: tree.with_shardings(s.abstract_state[self._key],
                                                   s.state_sharding[self._key])}
    ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt_keep)
    self.steps, self._ckpt = ckpt.all_steps(), ckpt
    ckpt.close()

  def resolve(self, step: int | None = None) -> int:
    """`step`, or the latest when None; a missing one names the steps there are."""
    step = max(self.steps, default=None) if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self._ckpt.directory}.')
    if step not in self.steps:
      raise FileNotFoundError(f'No checkpoint at step {step} in {self._ckpt.directory}; '
                              f'steps: {self.steps}.')
    return step

  def params(self, step: int):
    self._ckpt.check_structure(self._abstract_state, step)  # Names what differs.
    restore_args = jax.tree.map(
        lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape,
                                       dtype=a.dtype), self._target)
    # 'default' is the item the Checkpointer's orbax manager saves the state under.
    path = fs.path(fs.join(self._ckpt.directory, str(step), 'default'))
    with ocp.PyTreeCheckpointer() as reader:
      state = reader.restore(path, args=ocp.args.PyTreeRestore(
          item=self._target, restore_args=restore_args, partial_restore=True))
    return state[self._key]


def restore_params(config, workdir: str, step: int | None = None):
  """(model, mesh, params, step) of `step` (default latest) in `workdir`."""
  run = RunCheckpoints(config, workdir)
  step = run.resolve(step)
  return run.model, run.mesh, run.params(step), step


def _only(config, only):
  if not only:
    return config
  unknown = set(only) - set(config.evals)
  if unknown:
    raise ValueError(f'Unknown evals {sorted(unknown)}; valid: {sorted(config.evals)}')
  config = config.copy_and_resolve_references()
  for name in set(config.evals) - set(only):
    del config.evals[name]
  return config


def evaluate_steps(config, workdir: str, steps=None, *, only=None, out_dir=None):
  """Runs `config.evals` (or the names in `only`) on checkpoints of `workdir`; returns
  {step: metrics}. steps: None (the latest), 'all', or a list of steps."""
  config = _only(config, only)
  run = RunCheckpoints(config, workdir)
  if steps == 'all':
    steps = list(run.steps) or [run.resolve()]  # resolve() names the empty directory.
  else:
    steps = [run.resolve(s) for s in (steps if steps is not None else [None])]
  evaluators = evaluate.build_evaluators(config, evaluate.Predictor(run.model, run.mesh))
  # Never truncates: an old step's results must not drop later rows.
  writer = metrics_lib.MetricWriter(out_dir or fs.join(workdir, 'eval'),
                                    resume_step=sys.maxsize)
  results = {}
  for step in steps:
    params, metrics = run.params(step), {}
    for evaluator, _ in evaluators.values():
      metrics.update(evaluator.run(params))
    writer.write(step, metrics)
    writer.flush()  # A long sweep keeps what it has if it is stopped.
    results[step] = metrics
  writer.close()
  return results


def evaluate_checkpoint(config, *, workdir=None, checkpoint=None, only=None, out_dir=None):
  """Runs `config.evals` (or the names in `only`) on a checkpoint; returns (step, metrics)."""
  workdir, step = resolve_checkpoint(workdir, checkpoint)
  (step, metrics), = evaluate_steps(config, workdir, [step], only=only,
                                    out_dir=out_dir).items()
  return step, metrics


def format_steps_table(results: dict[int, dict[str, float]]) -> str:
  """One row per metric, one column per step: how every evaluation moved over a run."""
  steps = sorted(results)
  names = sorted({k for m in results.values() for k in m})
  width = max((len(n) for n in names), default=6)
  cols = [max(len(str(s)), 8) for s in steps]
  lines = [f'{"metric":<{width}}  ' + '  '.join(f'{s:>{w}}' for s, w in zip(steps, cols))]
  for n in names:
    cells = [f'{results[s][n]:>{w}.4f}' if n in results[s] else ' ' * (w - 1) + '-'
             for s, w in zip(steps, cols)]
    lines.append(f'{n:<{width}}  ' + '  '.join(cells))
  return '\n'.join(lines)


def plot_steps(results: dict[int, dict[str, float]], out: str) -> str | None:
  """evals.png of the report's evaluation panels across the steps; None if none applies."""
  rows = [{'step': s, **results[s]} for s in sorted(results)]
  panels = [p for p in report.EVAL_PANELS if plots._series(rows, p)]
  if not panels:
    return None
  return plots.plot_runs([rows], out, panels, labels=[''], columns=4)


def format_table(metrics: dict[str, float], step: int | None = None) -> str:
  """Metrics grouped under `<kind>/<dataset>` headings, one `name  value` line each."""
  groups = {}
  for k in sorted(metrics):
    parts = k.split('/')
    head, tail = ('/'.join(parts[:2]), '/'.join(parts[2:])) if len(parts) > 2 else ('', k)
    groups.setdefault(head, []).append((tail, metrics[k]))
  width = max((len(t) for g in groups.values() for t, _ in g), default=0)
  lines = [f'Evaluation at step {step}'] if step is not None else []
  for head, items in groups.items():
    if head:
      lines.append(head)
    lines += [f'{"  " if head else ""}{t:<{width}}  {v:10.4f}' for t, v in items]
  return '\n'.join(lines)
