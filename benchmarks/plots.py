"""The two PNG plots: memory against batch size (CPU-compiled), and GPU-compiled memory
against modeled GPU step time."""
from __future__ import annotations

import os
from typing import Sequence

from benchmarks import gpu_aot
from benchmarks.cases import RAZOR_DEFAULT
from benchmarks.records import Record, sort_key
from benchmarks.report import GIB, METHOD_COLUMNS, Index


def _pyplot():
  import matplotlib  # pylint: disable=g-import-not-at-top  (optional: the `bench` extra)
  matplotlib.use("Agg")  # files only; no display
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  return plt


def matplotlib_ticker():
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  return matplotlib.ticker


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
        style = "-" if label in ("full", "remat", RAZOR_DEFAULT.label) else ":"
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


# Each model at the batch its findings speak of (benchmarks.gpu_report.HEADLINE), the
# small ones at the largest GPU-compiled batch.
HEADLINE_BATCH = {"Ti/16": 128, "S/16": 128, "B/16": 32, "L/16": 128}
_DTYPE_MARKERS = {"float32": "o", "bfloat16": "^"}
_METHOD_COLORS = {"full": "tab:red", "remat": "tab:blue"}


def memory_vs_time(records: Sequence[Record], path: str):
  """One panel per model at its headline batch: GPU-compiled peak against modeled step
  time, a labelled point per method (colour) and compute dtype (marker).

  From the gpu-aot records (benchmarks/gpu_aot.py); without them the figure says so.
  """
  plt = _pyplot()
  aot = [r for r in records if gpu_aot.is_aot(r.backend) and r.modeled
         and r.compiled_peak_bytes and r.batch == HEADLINE_BATCH.get(r.model)]
  models = [m for m in HEADLINE_BATCH if any(r.model == m for r in aot)]
  fig, axes = plt.subplots(1, max(len(models), 1), figsize=(3.9 * max(len(models), 1), 3.8),
                           squeeze=False)
  for ax, model in zip(axes[0], models):
    rows = sorted((r for r in aot if r.model == model), key=sort_key)
    for r in rows:
      x, y = r.modeled["time_s"] * 1e3, r.compiled_peak_bytes / GIB
      color = _METHOD_COLORS.get(r.method, "tab:green")
      ax.plot([x], [y], marker=_DTYPE_MARKERS.get(r.dtype, "s"), color=color,
              linestyle="none")
      ax.annotate(f"{r.label}{' bf16' if r.dtype == 'bfloat16' else ''}", (x, y), fontsize=6,
                  xytext=(4, 2), textcoords="offset points")
    ax.set_yscale("log")
    ticks = matplotlib_ticker().FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(ticks)
    ax.yaxis.set_minor_formatter(ticks)
    ax.tick_params(axis="y", which="minor", labelsize=6)
    # Room on the right for the labels of the slowest points.
    ax.set_xlim(0, 1.3 * max(r.modeled["time_s"] * 1e3 for r in rows))
    ax.set_title(f"ViT-{model}, batch {HEADLINE_BATCH[model]}", fontsize=9)
    ax.set_xlabel("modeled H200 step time (ms)")
    ax.grid(True, which="both", alpha=0.3)
  if not models:
    axes[0][0].text(0.5, 0.5, "no GPU-compiled records\n(benchmark.py --gpu_aot)",
                    ha="center", va="center", transform=axes[0][0].transAxes)
    axes[0][0].set_axis_off()
  else:
    axes[0][0].set_ylabel("H200-compiled peak of one step (GiB)")
    handles = [plt.Line2D([], [], marker=m, linestyle="none", color="gray", label=d)
               for d, m in _DTYPE_MARKERS.items()]
    handles += [plt.Line2D([], [], marker="o", linestyle="none", color=c, label=l)
                for l, c in (*_METHOD_COLORS.items(), ("razor", "tab:green"))]
    axes[0][-1].legend(handles=handles, fontsize=6, loc="best")
  fig.suptitle("Compiled for an H200 without one; step time modeled. Lower left is better.",
               fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def render_all(records: Sequence[Record], directory: str) -> list[str]:
  paths = [os.path.join(directory, "memory_vs_batch.png"),
           os.path.join(directory, "memory_vs_time.png")]
  memory_vs_batch(records, paths[0])
  memory_vs_time(records, paths[1])
  return paths
