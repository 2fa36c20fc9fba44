"""Checkpoints with orbax: periodic async saves, keep-last-K, resume from the latest.

Orbax writes each step into a temporary directory and renames it when complete, so a
crash during a save never leaves a half-written checkpoint that resume would pick up.
Restores go straight into the target shardings (no unsharded copy of the parameters).
"""
import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
  """Saves and restores the train state `{'step', 'params', 'opt'}` under `workdir/ckpt`."""

  def __init__(self, workdir: str, *, keep: int = 3, every: int | None = None,
               async_save: bool = True):
    self.directory = os.path.join(os.path.abspath(workdir), 'ckpt')
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)
    self.every = every

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
    target = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state,
        shardings)
    return self._manager.restore(step, args=ocp.args.StandardRestore(target))

  def wait(self):
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()
