"""What a run reports: metrics as JSON lines and TensorBoard events, and a progress bar.

Only process 0 writes; the other hosts get objects that do nothing, so the loop calls
them unconditionally.
"""
from __future__ import annotations

import json
import os
import sys
import time
from typing import Mapping

import jax
import tensorboardX
import tqdm


class MetricsLog:
  """<workdir>/metrics.jsonl (one object per line, with "step") and TensorBoard events."""

  def __init__(self, workdir: str, *, enabled: bool = True):
    self._enabled = enabled and jax.process_index() == 0
    self._tb = None
    self._file = None
    if not self._enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # Appends: a resumed run continues the same file (steps between the last checkpoint
    # and the interruption appear twice; the later line is the one that counts).
    self._file = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, metrics: Mapping[str, float]):
    if not self._enabled:
      return
    row = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    self._file.write(json.dumps(row) + "\n")
    self._file.flush()
    if self._tb is not None:
      for name, value in row.items():
        if name != "step" and isinstance(value, (int, float)):
          self._tb.add_scalar(name, value, int(step))
      self._tb.flush()

  @staticmethod
  def read(workdir: str) -> list[dict]:
    """The rows of <workdir>/metrics.jsonl (none if it is missing; a cut last line is skipped)."""
    rows = []
    try:
      with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as f:
        for line in f:
          try:
            rows.append(json.loads(line))
          except ValueError:
            pass
    except OSError:
      pass
    return rows

  def close(self):
    if self._file is not None:
      self._file.close()
    if self._tb is not None:
      self._tb.close()


def _plain(value):
  """A JSON-friendly Python scalar from a numpy / jax scalar."""
  if hasattr(value, "item"):
    return value.item()
  return value


class Progress:
  """A tqdm bar over the steps with loss, accuracy and images/s; tqdm supplies the ETA."""

  def __init__(self, *, start: int, total: int, enabled: bool = True):
    self._bar = None
    self._postfix = {}
    if enabled and jax.process_index() == 0:
      # Off a terminal, \r updates pile up in log files: update rarely there.
      interval = 0.5 if sys.stderr.isatty() else 60.0
      self._bar = tqdm.tqdm(total=total, initial=start, unit="step", dynamic_ncols=True,
                            mininterval=interval, file=sys.stderr)

  def update(self, steps: int = 1, **postfix):
    if self._bar is not None:
      if postfix:
        self._postfix.update(postfix)
        self._bar.set_postfix(self._postfix, refresh=False)
      self._bar.update(steps)

  def print(self, line: str):
    """Prints a line above the bar (process 0 only)."""
    if jax.process_index() != 0:
      return
    if self._bar is not None:
      self._bar.write(line, file=sys.stdout)
    else:
      print(line, flush=True)

  def close(self):
    if self._bar is not None:
      self._bar.close()


class Throughput:
  """Images per second between calls, not counting the first step's compilation."""

  def __init__(self):
    self._time = None
    self._images = 0

  def start(self):
    self._time, self._images = time.perf_counter(), 0

  def add(self, images: int):
    self._images += images

  def rate(self) -> float:
    if self._time is None:
      return float("nan")
    elapsed = time.perf_counter() - self._time
    rate = self._images / elapsed if elapsed > 0 else float("nan")
    self.start()
    return rate
