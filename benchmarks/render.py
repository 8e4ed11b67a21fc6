"""Writes a results directory's README.md and plots from its benchmark.json and
transfer_accuracy.json."""
from __future__ import annotations

import os

from benchmarks import accuracy, records, report

BENCHMARK_JSON = "benchmark.json"
ACCURACY_JSON = "transfer_accuracy.json"


def write(directory: str, *, command: str = "python experiments/benchmark.py",
          plots: bool = True) -> list[str]:
  """(Re)writes README.md (and the PNGs unless `plots` is False); returns the paths."""
  rows = records.load(os.path.join(directory, BENCHMARK_JSON))
  accuracy_doc = accuracy.load(os.path.join(directory, ACCURACY_JSON))
  path = os.path.join(directory, "README.md")
  os.makedirs(directory, exist_ok=True)
  from benchmarks import fidelity  # pylint: disable=g-import-not-at-top
  extra = fidelity.section(directory)
  with open(path, "w", encoding="utf-8") as f:
    f.write(report.render(rows, accuracy_doc, command=command))
    if extra:
      f.write("\n" + "\n".join(extra))
  written = [path]
  if plots and rows:
    from benchmarks import plots as bench_plots  # pylint: disable=g-import-not-at-top
    written += bench_plots.render_all(rows, directory)
  return written
