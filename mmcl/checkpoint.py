"""Checkpoints with orbax: periodic async saves, keep-last-K, resume from the latest.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash during a save never leaves a half-written checkpoint that resume would pick up.
Restores go straight into the target shardings (no unsharded copy of the parameters).
Orbax stores arrays with tensorstore and metadata as JSON: nothing is ever unpickled.

The input pipeline's position is saved beside each checkpoint, under
`workdir/data_state/<step>/`, written (blocking) before the orbax save of that step starts,
so every complete checkpoint has a complete data state.
"""
import os
import shutil

import jax
import orbax.checkpoint as ocp

from mmcl.convert import io
from mmcl.parallel.partition import path_str


class Checkpointer:
  """Saves and restores the train state `{'step', 'params', 'opt'}` under `workdir/ckpt`."""

  def __init__(self, workdir: str, *, keep: int = 3, every: int | None = None,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'ckpt')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self._closed = False
    self.every = every
    self.data_directory = os.path.join(os.path.abspath(workdir), 'data_state')

  def is_due(self, step: int) -> bool:
    return bool(self.every) and step % self.every == 0 and step not in self.all_steps()

  def data_state_dir(self, step: int) -> str:
    return os.path.join(self.data_directory, str(step))

  def prune_data_states(self):
    """Drops data states older than the oldest kept checkpoint (process 0 only)."""
    steps = self.all_steps()
    if jax.process_index() or not steps or not os.path.isdir(self.data_directory):
      return
    for name in os.listdir(self.data_directory):
      if name.isdigit() and int(name) < min(steps):
        shutil.rmtree(os.path.join(self.data_directory, name), ignore_errors=True)

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state, *, force: bool = False) -> bool:
    """Starts an (async) save of `state` at `step` if it is due (every N steps) or forced."""
    if not force and (not self.every or step % self.every):
      return False
    if step in self._manager.all_steps():
      return False
    return self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, abstract_state, shardings, step: int | None = None):
    """Restores `step` (default latest) into the given shardings."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'No checkpoint in {self.directory}.')
    self.check_structure(abstract_state, step)
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        shardings)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def check_structure(self, abstract_state, step: int):
    """Refuses a checkpoint whose parameters do not match the model's, naming them all.

    (The optimizer state follows the parameters; orbax checks it on restore.)
    """
    metadata = ocp.StandardCheckpointer().metadata(
        os.path.join(self.directory, str(step), 'default')).item_metadata
    saved = {path_str(p): tuple(m.shape) for p, m in jax.tree_util.tree_leaves_with_path(
        metadata['params']) if hasattr(m, 'shape')}
    want = {path_str(p): tuple(a.shape)
            for p, a in jax.tree_util.tree_leaves_with_path(abstract_state['params'])}
    missing, unexpected, shapes = io.diff_shapes(saved, want, label='checkpoint ')
    if missing or unexpected or shapes:
      raise ValueError(
          f'The checkpoint at step {step} in {self.directory} does not match the model: '
          f'missing {io.name_list(missing)}; unexpected {io.name_list(unexpected)}; '
          f'shape mismatches {io.name_list(shapes)}.')

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    """Waits for pending saves, then releases the manager's threads. Safe to call twice;
    reading (steps, restore) still works afterwards."""
    self._manager.wait_until_finished()
    if not self._closed:
      self._manager.close()
      self._closed = True
