"""Evaluates a saved checkpoint with the evaluators of `config.evals` (tools/eval.py).

The train state is restored straight into its shardings (as the train loop resumes), then
every evaluator runs once. Results go to `<out_dir>/metrics.jsonl` and TensorBoard (process
0 only), apart from the training run's own metrics.jsonl so nothing there is rewritten.

It needs the train state's layout, so it imports mmcl.train lazily (mmcl.train imports
this package); it would sit more naturally in mmcl/train/.
"""
import os
import sys

import jax

from mmcl import evaluate


def resolve_checkpoint(workdir: str | None, checkpoint: str | None) -> tuple[str, int | None]:
  """(workdir holding ckpt/, step or None = latest) from --workdir or --checkpoint."""
  if (workdir is None) == (checkpoint is None):
    raise ValueError('Give exactly one of --workdir (latest checkpoint) or --checkpoint '
                     f'(a <workdir>/ckpt/<step> directory); got workdir={workdir!r}, '
                     f'checkpoint={checkpoint!r}.')
  if workdir is not None:
    return workdir, None
  path = os.path.abspath(checkpoint.rstrip('/'))
  step, parent = os.path.basename(path), os.path.dirname(path)
  if not step.isdigit() or os.path.basename(parent) != 'ckpt' or not os.path.isdir(path):
    raise ValueError(f'--checkpoint={checkpoint!r} is not a <workdir>/ckpt/<step> directory '
                     'written by mmcl.')
  return os.path.dirname(parent), int(step)


def restore_params(config, workdir: str, step: int | None = None):
  """(model, mesh, params, step) of `step` (default latest) in `workdir`."""
  from mmcl import checkpoint as checkpoint_lib
  from mmcl import models
  from mmcl.parallel import mesh as mesh_lib
  from mmcl.train import optim, step as step_lib, validate as validate_lib
  mesh = validate_lib.validate(config)
  model = models.get_model(config.model)
  sharding = mesh_lib.batch_sharding(mesh)
  b, size = config.batch_size, config.image_size
  batch_shapes = {
      'image': jax.ShapeDtypeStruct((b, size, size, 3), 'float32', sharding=sharding),
      'text': jax.ShapeDtypeStruct((b, config.text_len), 'int32', sharding=sharding)}
  rng = jax.random.key(config.seed)
  params_shape = jax.eval_shape(
      lambda: model.init({'params': rng}, *[jax.numpy.zeros(s.shape, s.dtype)
                                            for s in batch_shapes.values()])['params'])
  tx = optim.make_optimizer(config, params_shape)
  abstract, shardings = step_lib.state_shardings(model, tx, rng, batch_shapes, mesh,
                                                 config.sharding_rules)
  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt_keep)
  step = ckpt.latest_step() if step is None else step
  if step is None:
    raise FileNotFoundError(f'No checkpoint in {ckpt.directory}.')
  if step not in ckpt.all_steps():
    raise FileNotFoundError(f'No checkpoint at step {step} in {ckpt.directory}; '
                            f'steps: {ckpt.all_steps()}.')
  state = ckpt.restore(abstract, shardings, step)
  ckpt.close()
  return model, mesh, state['params'], step


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
  writer = metrics_lib.MetricWriter(out_dir or os.path.join(workdir, 'eval'),
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
