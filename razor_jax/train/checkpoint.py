"""Train-state checkpoints in <workdir>/checkpoints with orbax's CheckpointManager.

A step directory only appears once orbax has finished writing it (it writes to a
temporary name and renames), so a process killed mid-save leaves the previous
checkpoint as the latest one; the temporary leftovers are cleaned up on the next start.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp


class Checkpoints:
  """Save / restore of one pytree (the TrainState) per step; the last `keep` stay."""

  def __init__(self, workdir: str, *, keep: int = 3, async_save: bool = True):
    if keep < 1:
      raise ValueError(f"keep_checkpoints must be at least 1, got {keep}")
    self.directory = os.path.join(os.path.abspath(workdir), "checkpoints")
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.LatestN(n=keep),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,
        create=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any):
    """Starts writing `state` as `step` (device-to-host copy now, the files in background)."""
    self._manager.save(step, args=ocp.args.StandardSave(state), force=True)

  def restore(self, step: int, abstract_state: Any = None) -> Any:
    """The state saved at `step`, laid out as `abstract_state` (ShapeDtypeStructs with
    shardings); without one, as saved, in host memory."""
    return self._manager.restore(step, args=ocp.args.StandardRestore(abstract_state))

  def wait(self):
    """Blocks until every save started so far is on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def has_checkpoint(workdir: str) -> bool:
  """Whether <workdir>/checkpoints holds a finished step (cheap: no orbax involved)."""
  directory = os.path.join(workdir, "checkpoints")
  return os.path.isdir(directory) and any(name.isdigit() for name in os.listdir(directory))


def abstract_like(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs of `tree` carrying `shardings`: what restore lays the arrays out as."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      tree, shardings)


def load_params(workdir: str, step: Optional[int] = None) -> Any:
  """The params saved in `workdir` at `step` (default: the latest), as host numpy arrays.

  For export (razor_jax.models.vit.export) or inspection after a run.
  """
  ckpts = Checkpoints(workdir, async_save=False)
  try:
    step = ckpts.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpts.directory}")
    restored = ckpts.restore(step)
  finally:
    ckpts.close()
  return jax.tree.map(np.asarray, restored["params"])
