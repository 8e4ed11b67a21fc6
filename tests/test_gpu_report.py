"""benchmarks/gpu_report.py and the GPU figure: GPU-compiled records in results/README.md."""
import os

import pytest

from benchmarks import gpu_report, records, render
from benchmarks.cases import Case, parse_method
from benchmarks.records import Record

GIB = 2**30
AOT = "gpu-aot:h200"


def _modeled(ms, launches, round_trips=0):
  return {"time_s": ms / 1e3, "arithmetic_s": ms / 4e3, "bytes_s": ms / 2e3,
          "launch_s": launches * 4e-6, "round_trip_s": round_trips * 15e-6,
          "launches": launches, "round_trips": round_trips, "tflops": 1.0, "hbm_gb": 2.0,
          "fusions": 300, "while_loops": 2, "unknown_trip_loops": 0, "conditionals": 0}


def _records():
  rows = []
  figures = {"full": (100.0, 350.0, 4000), "remat": (10.0, 300.0, 3000),
             "razor@0.8": (8.0, 420.0, 7000)}
  for label, (gib, ms, launches) in figures.items():
    case = Case("L/16", 128, parse_method(label))
    rows.append(Record.for_case(case, AOT, compiled_peak_bytes=int(gib * GIB),
                                modeled=_modeled(ms, launches),
                                settings={"granularity": "token", "batch_chunk": 0},
                                device="NVIDIA H200 (compiled, no device)"))
    rows.append(Record.for_case(case, "cpu", compiled_peak_bytes=int(1.1 * gib * GIB)))
  return rows


def test_findings_compare_with_remat_first_then_full():
  (line,) = gpu_report.findings(_records())
  assert line.startswith("- H200 (compiled, no device), ViT-L/16 b128 float32 compute")
  assert "8.00 GiB = 0.80× remat (10.00 GiB), 0.080× full (100.00 GiB)" in line
  assert line.index("× remat") < line.index("× full")
  assert "modeled step 1.40× remat, 1.20× full (7,000 kernel launches, 0 host round" in line


def test_tables_put_gpu_and_cpu_side_by_side_and_model_the_time():
  rows = _records()
  table = "\n".join(gpu_report.side_by_side(rows))
  # GPU 8.00 GiB, 0.80x remat, 0.080x full; CPU 8.80 GiB, 0.80x its remat.
  assert ("| ViT-L/16 | 128 | float32 | razor@0.8 | 8.00 | 0.80 | 0.080 | — | 8.80 | 0.80 |"
          in table)
  modeled = "\n".join(gpu_report.modeled_table(rows))
  assert "| ViT-L/16 | 128 | float32 | razor@0.8 | 420.0 | 105.0 | 210.0 | 28.0 | 0.0 | 1.40 |" \
      " 1.20 | 7,000 | 0 | 300 / 2 (0) / 0 |" in modeled
  assert "4 µs per kernel launched" in "\n".join(gpu_report.assumptions())
  assert gpu_report.side_by_side([r for r in rows if r.backend == "cpu"])[0].startswith(
      "No GPU-compiled records")


def test_readme_and_figure_from_gpu_compiled_records(tmp_path):
  out = str(tmp_path)
  records.save(os.path.join(out, render.BENCHMARK_JSON), _records())
  loaded = records.load(os.path.join(out, render.BENCHMARK_JSON))
  assert sorted(loaded, key=records.sort_key) == sorted(_records(), key=records.sort_key)
  paths = render.write(out)
  text = open(paths[0], encoding="utf-8").read()
  for needle in ("## GPU-compiled beside CPU-compiled", "## Modeled step time",
                 "H200 compiled (GiB)", "granularity \"token\"",
                 "Measured on a GPU: none"):
    assert needle in text, needle
  # GPU-compiled records are not a GPU run: the measured-GPU table stays empty.
  assert "No GPU records: no GPU was available" in text
  with open(os.path.join(out, "memory_vs_time.png"), "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("missing", ["remat", "full"])
def test_findings_need_the_three_methods(missing):
  rows = [r for r in _records() if r.label != missing]
  assert gpu_report.findings(rows) == []


def test_a_real_gpu_run_sits_beside_its_deviceless_twin(monkeypatch):
  from benchmarks import child, report, suite  # pylint: disable=g-import-not-at-top
  case = Case("L/16", 128, parse_method("razor@0.8"))
  result = {"measured_peak_bytes": 7 * GIB, "peak_kind": "device_peak_bytes_in_use",
            "compiled_peak_bytes": int(6.5 * GIB), "step_times": [0.40, 0.44, 0.42],
            "modeled": _modeled(400.0, 7100)}
  monkeypatch.setattr(child, "run_child", lambda *a, **k: result)
  monkeypatch.setattr(suite.bench_step, "packed_bits", lambda c: 1.0)
  plan = suite.Plan(measured=(case,), ratios_from_children=True)
  (gpu,) = suite.run(plan, say=lambda line: None)
  assert gpu.modeled["launches"] == 7100 and gpu.step_time_s == pytest.approx(0.42)
  gpu.backend, gpu.device = "gpu", "NVIDIA H200"  # as on a GPU (this test runs on CPU)
  table = "\n".join(report.gpu_table(_records() + [gpu]))
  # measured 7.00 GiB, compiled here 6.50, compiled without a GPU 8.00; 420 ms measured,
  # 400 modeled from the executable that ran, 420 modeled from the deviceless compile.
  assert "| NVIDIA H200 | L/16 | 128 | razor@0.8 | float32 | 6.50 | 7.00 | 8.00 | 420.0 |" \
      " 400.0 | 420.0 |" in table, table
