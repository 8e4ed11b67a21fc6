"""The workdir before a run: can it be written, and does the config fit what it holds?

Everything here runs before anything is compiled or written, so a run that fails these
checks ends within seconds and leaves the workdir as it found it.

A workdir with a checkpoint belongs to one run. Its config.json is compared with the
new config: fields that shape the checkpoint or the trajectory (model, dataset, batch,
optimizer, seed, init_path, ...) cannot change under it; the ones in MUTABLE (how long,
how often to log / evaluate / save, where the data lives, the device layout) can, and
each change is appended to config_changes.jsonl before config.json is rewritten.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from typing import Any

from flax import traverse_util

from razor_jax.train import config as train_config
from razor_jax.train.setup import UserError

CONFIG_FILE, CHANGES_FILE = "config.json", "config_changes.jsonl"

# Dotted config fields a resumed run may change; a group name covers its fields.
MUTABLE = ("total_steps", "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
           "async_checkpointing", "memory_report", "progress_bar", "data_dir", "manual_dir",
           "eval_batch_size", "mesh")


class WorkdirError(UserError, OSError):
  """--workdir cannot hold a run: a file, not writable, or on a read-only filesystem."""


class ConfigChangedError(UserError, ValueError):
  """A rerun changes fields that the workdir's checkpoint was made under."""


def check_writable(workdir: str):
  """Raises WorkdirError unless `workdir` is (or can be created as) a writable folder.

  Creates nothing: a missing workdir is judged by its nearest existing parent, and the
  write probe is a temporary file that is gone when this returns.
  """
  path = os.path.abspath(workdir)
  existing = path
  while not os.path.exists(existing):
    existing = os.path.dirname(existing)
  fix = "; pass --workdir DIR with a writable folder (it is created if missing)"
  if not os.path.isdir(existing):
    what = "is a file" if existing == path else f"is inside {existing!r}, which is a file"
    raise WorkdirError(f"workdir {workdir!r} {what}, not a folder{fix}")
  try:
    # os.access is not enough: root passes it on read-only mounts' folders too.
    with tempfile.TemporaryFile(dir=existing, prefix=".razor_write_probe"):
      pass
  except OSError as e:
    where = "" if existing == path else f" (its parent {existing!r} is where it would be made)"
    raise WorkdirError(f"workdir {workdir!r} is not writable{where}: {e.strerror or e}{fix}"
                       ) from None


def saved_config(workdir: str) -> dict | None:
  """The config.json of `workdir` as a dict, or None if there is none (or it is unreadable)."""
  try:
    with open(os.path.join(workdir, CONFIG_FILE), encoding="utf-8") as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


def _is_mutable(dotted: str) -> bool:
  return any(dotted == m or dotted.startswith(m + ".") for m in MUTABLE)


def config_changes(old: dict, new: dict) -> dict[str, tuple[Any, Any]]:
  """{dotted field: (old value, new value)} for every field that differs."""
  flat_old = traverse_util.flatten_dict(old, sep=".")
  flat_new = traverse_util.flatten_dict(new, sep=".")
  missing = object()
  return {k: (flat_old.get(k), flat_new.get(k))
          for k in sorted(set(flat_old) | set(flat_new))
          if flat_old.get(k, missing) != flat_new.get(k, missing)}


def check_config_unchanged(config, workdir: str) -> dict[str, tuple[Any, Any]]:
  """The allowed changes from the workdir's config.json; raises ConfigChangedError otherwise.

  Only a workdir with a checkpoint is held to its config (one whose run failed before
  its first checkpoint starts afresh).
  """
  old = saved_config(workdir)
  if old is None:
    return {}
  # Through JSON, as config.json was written: tuples become lists on both sides.
  changes = config_changes(old, json.loads(config.to_json()))
  # A field added to the trainer since the workdir's run (model.name, ...) is no change
  # while it holds its default, the behaviour that run had.
  old_keys = traverse_util.flatten_dict(old, sep=".")
  defaults = traverse_util.flatten_dict(json.loads(train_config.get_config().to_json()), sep=".")
  changes = {k: v for k, v in changes.items()
             if k in old_keys or k not in defaults or v[1] != defaults[k]}
  fixed = {k: v for k, v in changes.items() if not _is_mutable(k)}
  if fixed:
    listed = ", ".join(f"{k} ({old_value!r} -> {new_value!r})"
                       for k, (old_value, new_value) in fixed.items())
    raise ConfigChangedError(
        f"workdir {workdir!r} holds a run whose checkpoint was made with another config:"
        f" {listed} cannot change when resuming. Rerun without changing them, or pass a new"
        f" --workdir to start another run (may change: {', '.join(MUTABLE)})")
  return changes


def record_config(config, workdir: str, changes: dict, step: int | None):
  """Writes config.json, after appending `changes` (if any) to config_changes.jsonl."""
  os.makedirs(workdir, exist_ok=True)
  if changes:
    row = {"time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "resumed_at_step": step,
           "changes": {k: {"old": old, "new": new} for k, (old, new) in changes.items()}}
    with open(os.path.join(workdir, CHANGES_FILE), "a", encoding="utf-8") as f:
      f.write(json.dumps(row) + "\n")
  with open(os.path.join(workdir, CONFIG_FILE), "w", encoding="utf-8") as f:
    f.write(config.to_json(indent=2))
