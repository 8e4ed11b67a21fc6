"""Train-state checkpoints in <workdir>/checkpoints with orbax's CheckpointManager.

A step directory only appears once orbax has finished writing it (it writes to a
temporary name and renames), so a process killed mid-save leaves the previous
checkpoint as the latest one; the temporary leftovers are cleaned up on the next start.
A step damaged after the fact (a truncated data file, an emptied _METADATA) is moved
to <workdir>/damaged_checkpoints/ and the newest intact step is restored instead.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from typing import Any, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from razor_jax.train.step import TrainState


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
    self._manager.save(step, args=ocp.args.StandardSave(_on_disk(state)), force=True)

  def restore(self, step: int, abstract_state: Any = None) -> Any:
    """The state saved at `step`, laid out as `abstract_state` (ShapeDtypeStructs with
    shardings); without one, as saved, in host memory."""
    restored = self._manager.restore(step, args=ocp.args.StandardRestore(_on_disk(abstract_state)))
    if isinstance(abstract_state, TrainState) and isinstance(restored, dict):
      return TrainState(**restored)
    return restored

  def restore_latest(self, abstract_state: Any, say=print) -> tuple[Optional[int], Any]:
    """(step, state) of the newest step that restores; (None, None) when none is left.

    Damaged steps are moved aside (not deleted: they may be all there is) with one line
    each through `say`, instead of orbax's pages of asynchronous tracebacks.
    """
    for step in sorted(self.all_steps(), reverse=True):
      problem = quick_check(os.path.join(self.directory, str(step)))
      if problem is None:
        try:
          with _quiet_logs():
            return step, self.restore(step, abstract_state)
        except Exception as e:  # pylint: disable=broad-except  (tensorstore, json, orbax)
          problem = _first_line(e)
      moved = self._move_aside(step)
      say(f"checkpoint of step {step} is damaged ({problem}); moved to {moved}, resuming from"
          " the newest intact one")
    return None, None

  def _move_aside(self, step: int) -> str:
    damaged = os.path.join(os.path.dirname(self.directory), "damaged_checkpoints")
    target = os.path.join(damaged, f"{step}-{time.strftime('%Y%m%dT%H%M%S')}")
    if jax.process_index() == 0:
      os.makedirs(damaged, exist_ok=True)
      shutil.move(os.path.join(self.directory, str(step)), target)
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      multihost_utils.sync_global_devices(f"razor_jax: moved checkpoint {step} aside")
    self._manager.reload()
    return target

  def wait(self):
    """Blocks until every save started so far is on disk."""
    self._manager.wait_until_finished()

  def close(self):
    self._manager.wait_until_finished()
    self._manager.close()


def _on_disk(state: Any) -> Any:
  """The tree orbax writes for `state`: a TrainState without batch_stats (a ViT's) as the
  dict of its other fields, the layout checkpoints had before the field existed, so old
  and new checkpoints restore alike; anything else as it is."""
  if isinstance(state, TrainState) and not jax.tree.leaves(state.batch_stats):
    return {"step": state.step, "params": state.params, "opt_state": state.opt_state}
  return state


def quick_check(step_dir: str) -> Optional[str]:
  """What is wrong with a step folder that shows without reading its arrays, else None.

  Every JSON file orbax wrote must parse (an emptied or cut _METADATA does not), and no
  file may be empty. A truncated array file only shows when it is read (restore).
  """
  for root, _, files in os.walk(step_dir):
    for name in files:
      path = os.path.join(root, name)
      relative = os.path.relpath(path, step_dir)
      if os.path.getsize(path) == 0:
        return f"{relative} is empty"
      if name in ("_METADATA", "_CHECKPOINT_METADATA") or name.endswith(".json"):
        try:
          with open(path, encoding="utf-8") as f:
            json.load(f)
        except (ValueError, OSError) as e:
          return f"{relative} is not valid JSON: {e}"
  return None


def intact_steps(workdir: str) -> list[int]:
  """Finished steps in <workdir>/checkpoints that pass quick_check, oldest first (no orbax)."""
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  steps = sorted(int(name) for name in os.listdir(directory) if name.isdigit())
  return [s for s in steps if quick_check(os.path.join(directory, str(s))) is None]


def _first_line(error: Exception) -> str:
  text = str(error).strip()
  cause = error.__cause__ or error.__context__
  while not text and cause is not None:
    text, cause = str(cause).strip(), cause.__cause__ or cause.__context__
  line = text.splitlines()[0] if text else type(error).__name__
  return line if len(line) <= 200 else line[:200] + "..."


class _quiet_logs:
  """Silences absl/orbax/tensorstore logging while a restore that may fail runs."""

  def __enter__(self):
    self._level = logging.root.manager.disable
    logging.disable(logging.CRITICAL)

  def __exit__(self, *exc):
    logging.disable(self._level)


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
  return load_variables(workdir, step)["params"]


def load_variables(workdir: str, step: Optional[int] = None) -> dict:
  """{"params": ..., and "batch_stats": ... for a CNN} saved in `workdir` at `step`
  (default: the latest), as host numpy arrays: what model.apply takes.

  For a CNN's export (razor_jax.models.mobilenet_checkpoint.save_npz) or inspection.
  """
  ckpts = Checkpoints(workdir, async_save=False)
  try:
    step = ckpts.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpts.directory}")
    restored = ckpts.restore(step, _one_device_layout(ckpts.directory, step))
  finally:
    ckpts.close()
  keys = ("params", "batch_stats") if restored.get("batch_stats") else ("params",)
  return {k: jax.tree.map(np.asarray, restored[k]) for k in keys}


def _one_device_layout(directory: str, step: int) -> Any:
  """The saved tree's shapes and dtypes on this process's first device.

  Restoring "as saved" needs the devices the checkpoint was written from, which another
  topology (say 2 processes' checkpoint, read by 1) does not have.
  """
  with _quiet_logs():  # orbax warns about a metadata file that StandardSave never writes
    metadata = ocp.StandardCheckpointer().metadata(os.path.join(directory, str(step), "default"))
  tree = getattr(metadata, "item_metadata", metadata)
  device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device), tree)
