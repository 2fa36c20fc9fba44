"""Evaluates a saved checkpoint with the evaluators of `config.evals` (tools/eval.py).

Only the parameters are restored, straight into their training shardings; then every
evaluator runs once. Results go to `<out_dir>/metrics.jsonl` and TensorBoard (process
0 only), apart from the training run's own metrics.jsonl so nothing there is rewritten.

It needs the train state's layout, so it imports mmcl.train lazily (mmcl.train imports
this package); it would sit more naturally in mmcl/train/.
"""
import posixpath
import sys

from mmcl import evaluate, fs


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


def restore_params(config, workdir: str, step: int | None = None):
  """(model, mesh, params, step) of `step` (default latest) in `workdir`.

  Only the parameters are read (orbax partial restore), straight into the shardings the
  train loop's own setup gives them: no optimizer state is read or allocated. With
  config.ema.eval the EMA weights are read instead (state['ema'], mmcl/train/ema.py).
  """
  import jax
  import orbax.checkpoint as ocp
  from mmcl import checkpoint as checkpoint_lib
  from mmcl.train import ema as ema_lib
  from mmcl.train import loop  # Lazy: mmcl.train imports this package.
  s = loop.setup(config)
  key = ema_lib.eval_key(config)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt_keep)
  steps = ckpt.all_steps()
  ckpt.close()
  step = max(steps, default=None) if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {ckpt.directory}.')
  if step not in steps:
    raise FileNotFoundError(f'No checkpoint at step {step} in {ckpt.directory}; '
                            f'steps: {steps}.')
  ckpt.check_structure(s.abstract_state, step)  # Names what differs from the config's model.
  target = {key: jax.tree.map(
      lambda a, sh: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sh),
      s.abstract_state[key], s.state_sharding[key])}
  restore_args = jax.tree.map(
      lambda a: ocp.ArrayRestoreArgs(sharding=a.sharding, global_shape=a.shape, dtype=a.dtype),
      target)
  # 'default' is the item the Checkpointer's orbax manager saves the state under.
  path = fs.path(fs.join(ckpt.directory, str(step), 'default'))
  with ocp.PyTreeCheckpointer() as reader:
    state = reader.restore(path, args=ocp.args.PyTreeRestore(
        item=target, restore_args=restore_args, partial_restore=True))
  return s.model, s.mesh, state[key], step


def evaluate_checkpoint(config, *, workdir=None, checkpoint=None, only=None, out_dir=None):
  """Runs `config.evals` (or the names in `only`) on a checkpoint; returns (step, metrics)."""
  workdir, step = resolve_checkpoint(workdir, checkpoint)
  if only:
    unknown = set(only) - set(config.evals)
    if unknown:
      raise ValueError(f'Unknown evals {sorted(unknown)}; valid: {sorted(config.evals)}')
    config = config.copy_and_resolve_references()
    for name in set(config.evals) - set(only):
      del config.evals[name]
  model, mesh, params, step = restore_params(config, workdir, step)
  evaluators = evaluate.build_evaluators(config, evaluate.Predictor(model, mesh))
  metrics = {}
  for evaluator, _ in evaluators.values():
    metrics.update(evaluator.run(params))
  from mmcl.train import metrics as metrics_lib
  # Never truncates: an old step's results must not drop later rows.
  writer = metrics_lib.MetricWriter(out_dir or fs.join(workdir, 'eval'),
                                    resume_step=sys.maxsize)
  writer.write(step, metrics)
  writer.close()
  return step, metrics


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
