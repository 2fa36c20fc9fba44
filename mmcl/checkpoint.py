"""Checkpoints with orbax: periodic async saves, keep-last-K, resume from the newest good one.

Orbax writes each step into a temporary directory and renames it when complete (on GCS: a
commit file), so a crash during a save never leaves a half-written checkpoint that resume
would pick up. Restores go straight into the target shardings (no unsharded copy of the
parameters). Orbax stores arrays with tensorstore and metadata as JSON: nothing is ever
unpickled. Every path goes through mmcl.fs, so a workdir may be `gs://...`.

Integrity: a state with non-finite values is never saved, so keep-last-K only ever keeps
good states. On resume a checkpoint that cannot be read (truncated data, empty metadata) or
whose values are not finite is reported with its step and cause, moved aside to
`workdir/ckpt_corrupt/<step>` (kept for inspection, out of orbax's reach), and the next
older one is tried.

The input pipeline's position is saved beside each checkpoint, under
`workdir/data_state/<step>/` (mmcl/data/data_state.py): snapshotted before the orbax save
of that step starts, written during it, complete when `save` returns.
"""
import gc
import logging
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from mmcl import fs
from mmcl import tree
from mmcl.tree import path_str


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be used: unreadable, or holding non-finite values."""


class CheckpointMismatch(ValueError):
  """A checkpoint of another model (names or shapes differ): a config error, no fallback."""


class Checkpointer:
  """Saves and restores the train state `{'step', 'params', 'opt'}` under `workdir/ckpt`."""

  def __init__(self, workdir: str, *, keep: int = 3, every: int | None = None,
               async_save: bool = True):
    self.workdir = fs.join(workdir)
    self.directory = fs.join(workdir, 'ckpt')
    _check_gcs_client(self.directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(fs.path(self.directory), options=options)
    self._closed = False
    self.every = every
    self.data_directory = fs.join(workdir, 'data_state')

  def is_due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0 and step not in self.all_steps()

  def data_state_dir(self, step: int) -> str:
    return fs.join(self.data_directory, str(step))

  def save_data_state(self, step: int, batches):
    """Starts writing `batches`' position for `step` (every process its own shards; mmcl.fs
    paths, so local or remote): snapshotted now, written by a thread (`batches.wait()`)."""
    batches.save_async(self.data_state_dir(step))

  def restore_data_state(self, step: int, batches) -> bool:
    """Moves `batches` to the position saved at `step`; False if none was saved."""
    if not fs.isdir(self.data_state_dir(step)):
      return False
    batches.restore(self.data_state_dir(step))
    return True

  def prune_data_states(self):
    """Drops data states older than the oldest kept checkpoint (process 0 only)."""
    steps = self.all_steps()
    if jax.process_index() or not steps:
      return
    for name in fs.listdir(self.data_directory):
      if name.isdigit() and int(name) < min(steps):
        fs.rmtree(fs.join(self.data_directory, name))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, force: bool = False, batches=None) -> bool:
    """Starts an (async) save of `state` at `step` if it is due (every N steps) or forced.

    A state with non-finite values is refused (FloatingPointError) before anything is
    written, so the checkpoints kept are always good ones. With `batches`, their data
    state is started first, then the orbax save, then older data states are pruned.
    """
    if not force and (not self.every or step % self.every):
      return False
    if step in self._manager.all_steps():
      return False
    bad = nonfinite_names(state)
    if bad:
      raise FloatingPointError(
          f'The train state at step {step} has non-finite values in {tree.name_list(bad)}: '
          f'not saved; the newest checkpoint (step {self.latest_step()}) is kept.')
    if batches is not None:
      self.save_data_state(step, batches)
    saved = self._manager.save(step, args=ocp.args.StandardSave(state), force=True)
    if batches is not None:
      # Written during orbax's blocking copy of the state off the devices, complete when
      # save returns: orbax commits the step later, when its background write ends.
      batches.wait()
      self.prune_data_states()
    return saved

  def restore(self, abstract_state, shardings, step: int | None = None):
    """Restores `step` (default latest) into the given shardings.

    A checkpoint that does not match the model is a ValueError naming the parameters; one
    that cannot be read or holds non-finite values is a CheckpointError naming the step
    and the root cause (orbax's teardown noise suppressed).
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    target = tree.with_shardings(abstract_state, shardings)
    _drop_closed_loop_errors()  # Before the read: a failing one's threads call back early.
    cause = None
    try:
      self.check_structure(abstract_state, step, entries=True)
      state = self._manager.restore(step, args=ocp.args.StandardRestore(target))
    except CheckpointMismatch:
      raise
    except Exception as e:  # pylint: disable=broad-except
      cause = root_cause(e)
    if cause is not None:  # Outside the except block: the failed reads can be freed now.
      _collect_orbax_leftovers()
      # `from None`: a late orbax callback's 'Event loop is closed' may be the exception in
      # flight here, and the message already names the root cause.
      raise CheckpointError(
          f'The checkpoint at step {step} in {self.directory} cannot be read: {cause}') from None
    bad = nonfinite_names(state)
    if bad:
      raise CheckpointError(f'The checkpoint at step {step} in {self.directory} holds '
                            f'non-finite values in {tree.name_list(bad)}.')
    return state

  def restore_newest_good(self, abstract_state, shardings):
    """(state, step) of the newest checkpoint that restores and is finite, or (None, None)
    when there is none. Each bad newer one is reported and moved to `ckpt_corrupt/`, so
    that it is neither resumed from nor kept in place of a good one; when no checkpoint
    is good, nothing is moved and a CheckpointError lists them all."""
    problems = []
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, error = self.restore(abstract_state, shardings, step), None
      except CheckpointError as e:
        state, error = None, str(e)
      if not _all_processes_ok(error is None):  # Each reads its own shards: agree.
        error = error or f'Another process could not restore step {step}.'
        problems.append((step, error))
        _print(f'{error}\nTrying an older checkpoint.')
        continue
      if problems:
        self._move_aside([s for s, _ in problems])
        _print(f'Fell back to step {step}, the newest good checkpoint; bad checkpoints '
               f'{[s for s, _ in problems]} moved to {fs.join(self.workdir, "ckpt_corrupt")}.')
      return state, step
    if problems:
      raise CheckpointError(
          f'No usable checkpoint in {self.directory}:\n' +
          '\n'.join(f'  step {s}: {e}' for s, e in problems) +
          '\nMove them away to start afresh.')
    return None, None

  def _move_aside(self, steps):
    """Moves bad checkpoints (and their data states) to `workdir/ckpt_corrupt/`."""
    if jax.process_index() == 0:
      aside = fs.join(self.workdir, 'ckpt_corrupt')
      for step in steps:
        name = str(step)  # Step 4 bad a second time: 4.1 beside 4.
        for i in range(1, 1000):
          if not fs.exists(fs.join(aside, name)):
            break
          name = f'{step}.{i}'
        fs.rename(fs.join(self.directory, str(step)), fs.join(aside, name))
        if fs.isdir(self.data_state_dir(step)):
          fs.rename(self.data_state_dir(step), fs.join(aside, f'{name}.data_state'))
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils
      multihost_utils.sync_global_devices('mmcl_checkpoint_move_aside')
    self._manager.reload()

  def check_structure(self, abstract_state, step: int, entries: bool = False):
    """Refuses a checkpoint whose parameters do not match the model, naming them all;
    with `entries`, also one whose state has other top-level entries (e.g. 'ema').

    (The optimizer state follows the parameters; orbax checks it on restore.)
    """
    directory = fs.join(self.directory, str(step), 'default')
    try:  # The handler, not a Checkpointer: no warning about a step-level metadata file.
      metadata = ocp.StandardCheckpointHandler().metadata(fs.path(directory))
      metadata['params']  # pylint: disable=pointless-statement
    except Exception as e:  # pylint: disable=broad-except
      raise OSError(f'{directory}/_METADATA cannot be read: {root_cause(e)}') from None
    if entries and set(metadata.keys()) != set(abstract_state):
      raise CheckpointMismatch(
          f'The checkpoint at step {step} in {self.directory} holds the state entries '
          f'{sorted(metadata.keys())}, the config\'s state {sorted(abstract_state)}: '
          'config.ema.decay adds "ema" and config.self_distill adds "self_distill"; resume '
          'with the settings the run was started with.')
    saved = {path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(
        metadata['params']) if hasattr(m, 'shape')}
    want = {path_str(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_leaves_with_path(abstract_state['params'])}
    missing, unexpected, shapes = tree.diff_shapes(saved, want, label='checkpoint ')
    if missing or unexpected or shapes:
      raise CheckpointMismatch(
          f'The checkpoint at step {step} in {self.directory} does not match the model: '
          f'missing {tree.name_list(missing)}; unexpected {tree.name_list(unexpected)}; '
          f'shape mismatches {tree.name_list(shapes)}.')

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves, then releases the manager's threads. Safe to call twice;
    reading (steps, restore) still works afterwards."""
    self._manager.wait_until_finished()
    if not self._closed:
      self._manager.close()
      self._closed = True


def nonfinite_names(state) -> list[str]:
  """Names of the floating-point leaves of `state` holding a NaN or an infinity (one
  jitted reduction; every process gets the same answer)."""
  leaves = [(path_str(p), x) for p, x in jax.tree_util.tree_leaves_with_path(state)
            if jnp.issubdtype(x.dtype, jnp.floating)]
  if not leaves:
    return []
  finite = _finite_flags([x for _, x in leaves])
  return [name for (name, _), ok in zip(leaves, np.asarray(finite)) if not ok]


@jax.jit  # Module-level: compiled once per state layout, not at every save.
def _finite_flags(xs):
  return jnp.stack([jnp.isfinite(x).all() for x in xs])


def root_cause(error: BaseException) -> str:
  """The innermost exception of a chain, first line: e.g. tensorstore's OUT_OF_RANGE
  under orbax's wrappers."""
  while error.__cause__ is not None or (error.__context__ is not None and
                                        not error.__suppress_context__):
    error = error.__cause__ or error.__context__
  return f'{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error) else ""}'


def _collect_orbax_leftovers():
  """A failed orbax read leaves the other reads behind: collected at exit, their coroutines
  printed hundreds of lines ('... exception was never retrieved'), and tensorstore threads
  finishing later call back into the closed event loop ('Event loop is closed'), burying
  the cause. Collect the coroutines now, silently (_drop_closed_loop_errors takes the
  late callbacks)."""
  hook, asyncio_logger = sys.unraisablehook, logging.getLogger('asyncio')
  level = asyncio_logger.level
  sys.unraisablehook = lambda unraisable: None
  asyncio_logger.setLevel(logging.CRITICAL + 1)
  try:
    gc.collect()
  finally:
    sys.unraisablehook = hook
    asyncio_logger.setLevel(level)


def _drop_closed_loop_errors():
  """The late callbacks of a failed read reach Python as unraisable, or (from tensorstore's
  threads, by PyErr_Print) through sys.excepthook: drop their 'Event loop is closed' on
  both paths, and nothing else."""
  if not getattr(sys.unraisablehook, 'mmcl_drops_closed_loop', False):
    sys.unraisablehook = _drop_closed_loop_callbacks(
        sys.unraisablehook, lambda u: u.exc_value)
  if not getattr(sys.excepthook, 'mmcl_drops_closed_loop', False):
    sys.excepthook = _drop_closed_loop_callbacks(sys.excepthook, lambda *exc: exc[1])


def _closed_loop(e) -> bool:
  return isinstance(e, RuntimeError) and str(e) == 'Event loop is closed'


def _drop_closed_loop_callbacks(hook, error_of):
  def filtered(*args):
    if not _closed_loop(error_of(*args)):
      hook(*args)
  filtered.mmcl_drops_closed_loop = True
  return filtered


def _check_gcs_client(directory: str):
  """orbax lists and deletes gs:// checkpoints with google-cloud-storage, an optional
  dependency: say so at the start rather than fail at the first listing."""
  if not directory.startswith('gs://'):
    return
  from orbax.checkpoint._src.path import gcs_utils  # What orbax itself calls first.
  try:
    gcs_utils.is_hierarchical_namespace_enabled(directory)
  except ImportError as e:
    raise ImportError(f'A gs:// workdir ({directory}) needs google-cloud-storage, which '
                      'orbax uses to list and delete checkpoints there: pip install '
                      'google-cloud-storage.') from e


def _all_processes_ok(ok: bool) -> bool:
  if jax.process_count() == 1:
    return ok
  from jax.experimental import multihost_utils
  return bool(np.all(multihost_utils.process_allgather(np.int32(ok))))


def _print(message: str):
  if jax.process_index() == 0:
    print(message, flush=True)
