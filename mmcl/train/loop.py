"""The training loop: setup, sharded steps, logging, evaluation, checkpoints and resume.

The loop holds no math: `mmcl.train.step.train_step` is the whole update. Step N-1's
metrics are read only after step N is dispatched, so the host never stalls the device.
"""
import dataclasses
import os
import signal
import threading
import time
from typing import Any

from absl import logging
import jax
import ml_collections
import numpy as np

from mmcl import checkpoint as checkpoint_lib
from mmcl import evaluate, fs, losses, models, tree
from mmcl.data import data_state, drops, input_pipeline
from mmcl.parallel import mesh as mesh_lib
from mmcl.train import logger as logger_lib
from mmcl.train import metrics as metrics_lib
from mmcl.train import model_init
from mmcl.train import distill as distill_lib
from mmcl.train import ema as ema_lib
from mmcl.train import naflex_input
from mmcl.train import optim, profile, run_info, step as step_lib
from mmcl.train import throughput, wandb_run
from mmcl.train import validate as validate_lib
from mmcl.train import variants as variants_lib
from mmcl.train import workdir_lock


def _batch_shapes(config, mesh, distill=None) -> dict:
  b = config.batch_size
  size = config.image_size  # The image side after preprocessing; checked on batch 1.
  sharding = mesh_lib.batch_sharding(mesh)
  shapes = {'image': jax.ShapeDtypeStruct((b, size, size, 3), np.float32, sharding=sharding),
            'text': jax.ShapeDtypeStruct((b, config.text_len), np.int32, sharding=sharding)}
  if naflex_input.budget(config):  # The patch dict instead of [B, H, W, 3] images.
    shapes.update({k: jax.ShapeDtypeStruct((b, *shape), dtype, sharding=sharding)
                   for k, (shape, dtype) in naflex_input.example_shapes(config).items()})
  if distill is not None:  # The extra views, sharded over the batch axes like `image`.
    shapes.update({k: jax.ShapeDtypeStruct((b, *shape), np.float32, sharding=sharding)
                   for k, shape in distill_lib.view_shapes(config, distill).items()})
  for key, shape in _decoder_shapes(config).items():  # The captioning decoder's targets.
    shapes[key] = jax.ShapeDtypeStruct((b, *shape), np.int32, sharding=sharding)
  return shapes


def _decoder_shapes(config) -> dict:
  """{batch key: shape} of the decoder's inputs (mmcl/data/decoder_tasks.py), if any."""
  dec = config.model.get('decoder')
  if not dec:
    return {}
  length = dec.get('max_len', 64)
  return {'dec_tokens': (length,), 'dec_loss_mask': (length,)}


def _print_table(metrics: dict):
  if jax.process_index() != 0 or not metrics:
    return
  width = max(len(k) for k in metrics)
  print('\nFinal metrics', flush=True)
  for k in sorted(metrics):
    print(f'  {k:<{width}}  {metrics[k]:.4f}', flush=True)


@dataclasses.dataclass(frozen=True)
class Setup:
  """Everything a run builds from its config before touching data or devices' memory."""
  mesh: jax.sharding.Mesh
  model: Any
  tx: Any
  batch_shapes: dict
  abstract_state: Any
  state_sharding: Any
  train_step: Any  # Jitted, with explicit shardings; the state is donated.
  # step -> the jitted step of its model variant (mmcl/train/variants.py); None: train_step.
  step_for: Any = None
  ema: Any = None  # ema.Ema, or None (config.ema.decay unset).
  distill: Any = None  # distill.SelfDistill, or None (config.self_distill off).

  def init_state(self, rng):
    """A fresh train state, born sharded."""
    return jax.jit(lambda r: step_lib.init_state(self.model, self.tx, r, self.batch_shapes,
                                                 ema=self.ema, distill=self.distill),
                   out_shardings=self.state_sharding)(rng)

  def sharded_abstract_state(self):
    """The state as ShapeDtypeStructs carrying their shardings: what `lower` takes."""
    return tree.with_shardings(self.abstract_state, self.state_sharding)

  def compile(self):
    """The train step compiled from shapes only, for the devices of the mesh (a TPU
    topology's included): what memory_analysis() / cost_analysis() read."""
    return self.train_step.lower(self.sharded_abstract_state(), self.batch_shapes).compile()


def setup(config: ml_collections.ConfigDict, devices=None) -> Setup:
  """Validates `config` and builds the model, optimizer, shardings and jitted train step.

  `devices`: what the mesh spans (default: every device of every process); a TPU
  topology's devices compile the step for that slice without one (tools/compile.py).
  """
  # Everything a bad config can break, before compiling.
  mesh = validate_lib.validate(config, devices)
  model = models.get_model(config.model, mesh)
  loss_fn = losses.make_loss_fn(config.loss.name, config.loss.impl, mesh,
                                **{k: v for k, v in config.loss.items()
                                   if k not in ('name', 'impl', 'extras')})
  distill = distill_lib.from_config(config, mesh)  # SigLIP 2 self-distillation, or None.
  ema = ema_lib.from_config(config, distill.start_step if distill else 0)
  batch_shapes = _batch_shapes(config, mesh, distill)
  rng = jax.random.key(config.seed)
  params_shape = jax.eval_shape(lambda: step_lib.init_params(model, rng, batch_shapes, distill))
  tx = optim.make_optimizer(config, params_shape)
  abstract_state, state_sharding = step_lib.state_shardings(
      params_shape, tx, mesh, config.sharding_rules, ema=ema, distill=distill)

  def jit_step(model, distill=distill):
    return step_lib.jit_train_step(
        model, tx, loss_fn, optim.make_schedule(config), config.seed, state_sharding,
        mesh_lib.batch_sharding(mesh), mesh, accum_steps=config.get('accum_steps', 1),
        temperature=optim.make_temperature(config),
        loss_extras=dict(config.loss.get('extras', {})),
        trained=optim.trained_mask(config, params_shape), ema=ema, distill=distill,
        model_inputs=tuple(_decoder_shapes(config)),
        contrastive_weight=config.get('contrastive_weight', 1.0))

  # With self-distillation, `train_step` (what the compile tool and benchmarks read) is the
  # heavier program, with the terms on; the loop runs each phase's own (step_for).
  train_step = jit_step(model, distill and distill.fixed('on'))
  step_for = None
  if variants_lib.has_variants(config) or distill is not None:
    step_for = variants_lib.StepVariants(
        config, jit_step, mesh, distill,
        lower_args=(tree.with_shardings(abstract_state, state_sharding), batch_shapes))
  return Setup(mesh, model, tx, batch_shapes, abstract_state, state_sharding, train_step,
               step_for, ema, distill)


def compile_train_step(config: ml_collections.ConfigDict, devices=None):
  """The compiled train step of `config`, from shapes only (for memory/cost analysis)."""
  return setup(config, devices).compile()


def _data_shards(config) -> int:
  shards = config.input.get('shards') or jax.process_count()
  if shards % jax.process_count() or config.batch_size % shards:
    raise ValueError(
        f'config.input.shards={shards} must be a multiple of the {jax.process_count()} '
        f'processes and divide config.batch_size={config.batch_size}.')
  return shards


def train_dataset(config, seed: int, shard: int = 0, shards: int = 1):
  """One data shard's training stream (tf.data batches of batch_size // shards), as
  `make_batches` reads it: records carry their `_index`, and wrong shapes are dropped."""
  return input_pipeline.get_dataset(
      name=tuple(map(tuple, config.input.mixture)) or config.input.name,
      split=config.input.split, pp=train_pp(config),
      batch_size=config.batch_size, data_dir=config.get('data_dir'), train=True,
      shuffle_buffer=config.input.shuffle_buffer, seed=seed, process_index=shard,
      process_count=shards, cache=config.input.cache, with_index=True,
      shapes=_example_shapes(config),
      max_dropped_in_a_row=config.input.get('max_dropped_in_a_row', 10_000),
      source_options=config.input.get('csv'))


def train_pp(config) -> str:
  """config.input.pp, filled in, and ending with the NaFlex patchify op under config.naflex."""
  pp = input_pipeline.format_pp(config.input.pp, config)
  return naflex_input.train_pp(pp, config) if naflex_input.budget(config) else pp


def _example_shapes(config) -> dict:
  """{key: shape} of one training example: what the stream keeps."""
  size = config.image_size
  shapes = {'image': (size, size, 3), 'text': (config.text_len,), **_decoder_shapes(config)}
  if naflex_input.budget(config):
    shapes.update({k: s for k, (s, _) in naflex_input.example_shapes(config).items()})
  return shapes


def make_batches(config, mesh, seed: int) -> input_pipeline.ShardedBatches:
  """The training stream: this process's data shards, assembled into global batches."""
  shards = _data_shards(config)
  per_process = shards // jax.process_count()
  first = jax.process_index() * per_process
  size = config.image_size
  image = (f'NaFlex patches {_example_shapes(config)["image"]} (config.naflex.budget)'
           if naflex_input.budget(config) else
           f'image {(size, size, 3)} (config.image_size={size})')
  hint = (f'Records are kept with {image} and '
          f'text ({config.text_len},) (config.text_len); check config.input.name='
          f'{config.input.name!r}, config.input.pp and the files it reads.')
  return input_pipeline.ShardedBatches(
      lambda shard: train_dataset(config, seed, shard, shards),
      range(first, first + per_process), shards, mesh_lib.batch_sharding(mesh),
      stall_hint=hint)


class _Preemption:
  """SIGTERM: finish the current step, checkpoint it, exit cleanly. Processes agree.

  While the loop waits inside tf.data for a stream that keeps nothing, Python's handler
  cannot run: a thread reads the signal from the wakeup fd and calls `on_signal` (the
  stream's interrupt), which ends the wait.
  """

  def __init__(self, check_every: int = 1, on_signal=None):
    self.requested, self.check_every = False, check_every
    self._previous = signal.signal(signal.SIGTERM, self._handle)
    self._watcher = None
    if on_signal is not None:
      self._pipe = os.pipe()
      os.set_blocking(self._pipe[1], False)  # set_wakeup_fd wants a non-blocking fd.
      self._previous_fd = signal.set_wakeup_fd(self._pipe[1], warn_on_full_buffer=False)
      self._watcher = threading.Thread(target=self._watch, args=(on_signal,), daemon=True)
      self._watcher.start()

  def _watch(self, on_signal):
    while data := os.read(self._pipe[0], 64):  # b'' once close() shuts the pipe.
      if {signal.SIGTERM, signal.SIGINT} & set(data):
        on_signal()

  def _handle(self, signum, frame):
    del signum, frame
    self.requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() == 1:
      return self.requested
    if step % self.check_every:
      return False
    # Any process's signal stops all of them at the same step (a blocking host exchange,
    # hence only every `check_every` steps).
    from jax.experimental import multihost_utils
    flags = multihost_utils.process_allgather(np.int32(self.requested))
    return bool(np.any(flags))

  def close(self):
    signal.signal(signal.SIGTERM, self._previous)
    if self._watcher is not None:
      signal.set_wakeup_fd(self._previous_fd)
      os.close(self._pipe[1])
      self._watcher.join()
      os.close(self._pipe[0])
      self._watcher = None


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains `config` in `workdir`, resuming from its latest checkpoint; returns final metrics.

  Resume is exact: the checkpoint holds the train state and the input pipeline's position,
  and every random number derives from (seed, step), so an interrupted and resumed run
  computes the same parameters as an uninterrupted one. On SIGTERM the current step
  finishes, a checkpoint is written and the function returns (tools/train.py exits 0).
  """
  return _run(config, workdir, setup(config))


def _run(config, workdir: str, s: Setup) -> dict[str, float]:
  # One run per workdir: a second launch would interleave metrics and race checkpoints.
  with workdir_lock.WorkdirLock(workdir):
    return _train(config, workdir, s)


def _train(config, workdir: str, s: Setup) -> dict[str, float]:
  mesh, model, tx, batch_shapes = s.mesh, s.model, s.tx, s.batch_shapes
  abstract_state, state_sharding, train_step = s.abstract_state, s.state_sharding, s.train_step
  rng = jax.random.key(config.seed)

  ckpt = checkpoint_lib.Checkpointer(workdir, keep=config.ckpt_keep, every=config.ckpt_every)
  start = ckpt.latest_step()
  data_seed = config.seed
  if start is None:
    state = s.init_state(rng)
    if config.get('model_init'):  # Fine-tuning / LiT: params from a file, fresh optimizer.
      # The self-distillation heads are SigLIP 2's fresh extras: never in the file.
      fresh = tuple(config.get('model_init_dont_load', ())) + (
          (f'{distill_lib.KEY}/.*',) if s.distill else ())
      state['params'] = model_init.load(config.model_init, state['params'],
                                        state_sharding['params'], fresh)
      state['opt'] = jax.jit(tx.init, out_shardings=state_sharding['opt'])(state['params'])
      if 'ema' in state:  # The teacher starts from the loaded weights too.
        state['ema'] = jax.jit(lambda p: jax.tree.map(jax.numpy.copy, p),
                               out_shardings=state_sharding['ema'])(state['params'])
      if jax.process_index() == 0:
        print(f'Initialised from {config.model_init}', flush=True)
    start = 0
  else:
    # Bad newer checkpoints (unreadable, non-finite) are reported and moved aside.
    state, start = ckpt.restore_newest_good(abstract_state, state_sharding)
    if not fs.isdir(ckpt.data_state_dir(start)):
      data_seed = config.seed + start  # No saved position: at least do not replay batches.
      logging.warning('No data state for step %d: the input stream is reseeded.', start)
    if jax.process_index() == 0:
      print(f'Resumed from step {start} in {ckpt.directory}', flush=True)
  batches = make_batches(config, mesh, data_seed)
  if start and data_seed == config.seed:
    try:
      ckpt.restore_data_state(start, batches)
    except data_state.DataStateError as e:  # Damaged: like a missing one, reseeded.
      logging.warning('%s', e)
      if jax.process_index() == 0:
        print(f'The data state of step {start} is unusable, so the input stream is '
              f'reseeded: {e}', flush=True)
      batches = make_batches(config, mesh, config.seed + start)
  run_info.write(config, workdir, start)
  writer = metrics_lib.MetricWriter(workdir, resume_step=start,
                                    wandb_run=wandb_run.start(config, workdir))
  # Compiled here (not on the first call) for its cost analysis: the log's FLOP/s and MFU.
  # A caller's own step function (a test wrapping the jitted one) runs as given, unmeasured.
  measured = hasattr(train_step, 'lower')
  if s.step_for:  # The first step's variant, compiled by StepVariants.
    train_step = s.step_for(start + 1)
  elif measured:
    train_step = train_step.lower(s.sharded_abstract_state(), batch_shapes).compile()
  windows = profile.ProfileWindows(config.get('profile'), workdir, train_step)
  evaluators = evaluate.build_evaluators(config, evaluate.Predictor(model, mesh))

  def evals_due(step, final=False):
    return [evaluator for evaluator, every in evaluators.values()
            if final or (every and step % every == 0 and step != config.total_steps)]

  def run_evals(step, final=False):
    results = {}
    for evaluator in evals_due(step, final):
      results.update(evaluator.run(state[ema_lib.eval_key(config)]))
    if results:
      writer.write(step, results)
    return results

  def save(step, force=False):
    if force or ckpt.is_due(step):
      writer.flush()  # Rows logged so far are stored before the checkpoint (remote workdirs).
      # Refuses a non-finite state; writes the data state before the async orbax save.
      ckpt.save(step, state, force=True, batches=batches)

  logger = logger_lib.TrainLogger(
      config, writer, start, batches,
      step_flops=throughput.step_flops(train_step) if measured else 0.0,
      peak=throughput.device_peak(jax.local_devices()))
  preemption = _Preemption(config.get('preemption_check_every', 1),
                           on_signal=batches.interrupt)
  try:
    for step in range(start + 1, config.total_steps + 1):
      waited = time.perf_counter()
      try:
        batch = next(batches)
      except drops.InputInterrupted:  # SIGTERM while the stream kept nothing.
        if not preemption.requested:
          raise
        logger.close()
        writer.close()
        if jax.process_index() == 0:
          print(f'Preempted while waiting for input for step {step}: no checkpoint '
                f'written (the latest is step {ckpt.latest_step()}).', flush=True)
        return {}
      if step == start + 1:
        validate_lib.check_batch(batch, batch_shapes, config.loss.get('extras'))
      waited = time.perf_counter() - waited
      windows.before(step)
      # A run with model variants (FLIP's unmasked phase, FlexiViT) picks the step's program.
      step_fn = s.step_for(step) if s.step_for else train_step
      if measured and step_fn is not train_step:  # Another variant: its own FLOPs.
        train_step = step_fn
        logger.step_flops = throughput.step_flops(step_fn)
      state, metrics = step_fn(state, batch)
      logger.outside(windows.after(step, (state, metrics), config.total_steps))
      # Logs step-1's metrics now that `step` is in flight.
      logger.dispatched(step, metrics, input_secs=waited)
      if preemption.should_stop(step):
        logger.close()
        save(step, force=True)
        ckpt.close()
        writer.close()
        if jax.process_index() == 0:
          print(f'Preempted: checkpoint of step {step} written; run again to resume.',
                flush=True)
        return {}
      if ckpt.is_due(step) or evals_due(step):
        # The steps in flight finish first: their time is training, not the save's.
        jax.block_until_ready(state)
        outside = time.perf_counter()
        save(step)
        run_evals(step)
        logger.outside(time.perf_counter() - outside)
    logger.close()
    final = run_evals(config.total_steps, final=True)
    save(config.total_steps, force=config.total_steps not in ckpt.all_steps())
  finally:
    windows.close()
    preemption.close()
    # Also on an error (e.g. too many skipped steps): finish the async saves already
    # started, so the last checkpoint due before the failure is on disk to resume from.
    ckpt.close()
    writer.close()  # Stores the rows not yet flushed (remote workdirs flush every 30 s).
  _print_table(final)
  return final
