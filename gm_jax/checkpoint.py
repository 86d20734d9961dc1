"""Checkpoints under ``workdir/checkpoints`` with orbax.

``Checkpointer.restore_latest`` walks back from the newest step: a checkpoint
that cannot be read (truncated, corrupted, missing files) is reported, moved
aside to ``workdir/corrupt_checkpoints/`` (never deleted) and the previous one
is tried. Saves are asynchronous; orbax writes into a temporary folder and
renames it on completion, so a process killed mid-save leaves the earlier
checkpoints intact.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
  """No usable checkpoint could be restored although some exist."""


class Checkpointer:
  """Saves and restores a train-state pytree, keeping the newest few."""

  def __init__(self, workdir: str, max_to_keep: int = 3,
               async_save: bool = True):
    self.workdir = os.path.abspath(workdir)
    self.directory = os.path.join(self.workdir, "checkpoints")
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, create=True,
        enable_async_checkpointing=async_save)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def latest_step(self) -> Optional[int]:
    steps = self.all_steps()
    return steps[-1] if steps else None

  def save(self, step: int, state: Any) -> None:
    self._manager.save(step, args=ocp.args.StandardSave(state))

  def restore(self, step: int, abstract_state: Any) -> Any:
    """Restores ``step`` into the structure, dtypes and shardings given."""
    return self._manager.restore(
        step, args=ocp.args.StandardRestore(abstract_state))

  def restore_latest(self, abstract_state: Any) -> tuple[Optional[int], Any]:
    """Restores the newest readable checkpoint.

    Returns:
      (step, state), or (None, None) when there is no checkpoint at all.

    Raises:
      CheckpointError: every existing checkpoint is unreadable.
    """
    steps = self.all_steps()
    for step in reversed(steps):
      try:
        state = self.restore(step, abstract_state)
        _check_structure(state, abstract_state)
        return step, state
      except Exception as e:  # orbax/tensorstore raise many error types
        moved_to = self._quarantine(step)
        message = (
            f"Checkpoint at step {step} in {self.directory} could not be"
            f" restored ({type(e).__name__}: {str(e).splitlines()[0][:300]})."
            f" Moved it to {moved_to}")
        if step != steps[0]:
          message += "; trying the previous checkpoint."
        log.warning(message)
        print(f"WARNING: {message}", flush=True)
    if steps:
      raise CheckpointError(
          f"None of the checkpoints {steps} in {self.directory} could be"
          " restored; they were moved to"
          f" {os.path.join(self.workdir, 'corrupt_checkpoints')}. Start a new"
          " workdir or repair them.")
    return None, None

  def _quarantine(self, step: int) -> str:
    """Moves a broken step folder out of orbax's way, keeping its bytes."""
    source = os.path.join(self.directory, str(step))
    target_root = os.path.join(self.workdir, "corrupt_checkpoints")
    target = os.path.join(target_root, f"{step}_{int(time.time())}")
    if jax.process_index() == 0 and os.path.exists(source):
      os.makedirs(target_root, exist_ok=True)
      shutil.move(source, target)
    self._manager.reload()
    return target

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()


def _check_structure(state: Any, abstract_state: Any) -> None:
  got = jax.tree_util.tree_structure(state)
  want = jax.tree_util.tree_structure(abstract_state)
  if got != want:
    raise ValueError(f"restored tree {got} differs from expected {want}")
