"""The two PNG plots: memory against batch size, and memory against step time."""
from __future__ import annotations

import os
from typing import Sequence

from benchmarks.records import Record
from benchmarks.report import GIB, METHOD_COLUMNS, Index


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top  (optional: the `bench` extra)
  matplotlib.use("Agg")  # files only; no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def memory_vs_batch(records: Sequence[Record], path: str):
  """One panel per model: compiled peak (log) against batch size (log), a line per method."""
  plt = _pyplot()
  index = Index(records)
  models = index.models()
  fig, axes = plt.subplots(1, max(len(models), 1), figsize=(4 * max(len(models), 1), 3.6),
                           squeeze=False)
  for ax, model in zip(axes[0], models):
    for label in METHOD_COLUMNS:
      points = [(b, index.value(model, b, label, "compiled_peak_bytes"))
                for b in index.batches(model)]
      points = [(b, v / GIB) for b, v in points if v is not None]
      if points:
        style = "-" if label in ("full", "remat", "razor@0.9") else ":"
        ax.plot(*zip(*points), style, marker="o", markersize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_title("demo ViT, 32 px" if model == "demo" else f"ViT-{model}, 224 px")
    ax.set_xlabel("batch size")
    ax.grid(True, which="both", alpha=0.3)
  axes[0][0].set_ylabel("compiled peak of one train step (GiB)")
  fullest = max(axes[0], key=lambda ax: len(ax.get_lines()))
  fullest.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def memory_vs_time(records: Sequence[Record], path: str):
  """Peak (× full) against step time (× full): the trade-off, one series per model/batch.

  Peaks are the compiled ones (the measured ones where a series lacks them, as GPU
  records might).
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6.4, 4.6))
  groups = {}
  for r in records:
    if r.step_time_ratio is not None:
      groups.setdefault((r.backend, r.dtype, r.model, r.batch), []).append(r)
  for (backend, dtype, model, batch), rows in sorted(groups.items()):
    full = next((r for r in rows if r.label == "full"), None)
    if full is None:
      continue
    # One kind of figure per series: compiled where every point has it, else measured.
    field = ("compiled_peak_bytes" if all(r.compiled_peak_bytes for r in rows)
             else "measured_peak_bytes")
    peak = lambda r, field=field: getattr(r, field)
    if not peak(full):
      continue
    points = [(r.step_time_ratio, peak(r) / peak(full), r.label) for r in rows if peak(r)]
    points.sort()
    marker = "s" if backend != "cpu" else "o"
    name = f"{model} b{batch} ({backend}{'' if dtype == 'float32' else ', ' + dtype})"
    ax.plot([p[0] for p in points], [p[1] for p in points], marker=marker, linestyle="none",
            label=name)
    for x, y, label in points:
      ax.annotate(label, (x, y), fontsize=6, xytext=(3, 2), textcoords="offset points")
  ax.set_yscale("log")
  ax.set_xlabel("step time × full fine-tuning")
  ax.set_ylabel("peak memory × full fine-tuning (compiled)")
  ax.grid(True, which="both", alpha=0.3)
  if groups:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def render_all(records: Sequence[Record], directory: str) -> list[str]:
  paths = [os.path.join(directory, "memory_vs_batch.png"),
           os.path.join(directory, "memory_vs_time.png")]
  memory_vs_batch(records, paths[0])
  memory_vs_time(records, paths[1])
  return paths
