"""results/README.md's GPU sections: steps compiled for a GPU without one (gpu-aot records),
beside the CPU-compiled figures, and their modeled step times.

Pure functions of the records, like report.py.
"""
from __future__ import annotations

from typing import Optional, Sequence

from benchmarks import gpu_aot, gpu_time
from benchmarks.cases import RAZOR_DEFAULT
from benchmarks.records import Record, sort_key

GIB = 2**30
HEADLINE = (("L/16", 128), ("B/16", 32))  # the issues' targets: what findings speak of
METHODS = ("full", "remat", RAZOR_DEFAULT.label)


def _order(r: Record) -> tuple:
  """As records are sorted, but float32 compute (the CPU's too) before bfloat16."""
  backend, model_index, model, _, size, batch, method, ratio = sort_key(r)
  return (backend, model_index, model, r.dtype != "float32", size, batch, method, ratio)


def aot_records(records: Sequence[Record]) -> list[Record]:
  return sorted((r for r in records if gpu_aot.is_aot(r.backend)), key=_order)


def _find(records, model, batch, label, dtype, backend) -> Optional[Record]:
  return next((r for r in records if (r.model, r.batch, r.label, r.dtype, r.backend)
               == (model, batch, label, dtype, backend)), None)


def _gib(n) -> str:
  return "—" if n is None else f"{n / GIB:.2f}"


def _x(a, b, digits=2) -> str:
  return "—" if a is None or not b else f"{a / b:.{digits}f}"


def _ms(record: Optional[Record], part: str = "time_s") -> Optional[float]:
  return None if record is None or not record.modeled else record.modeled[part] * 1e3


def _table(header, rows) -> list[str]:
  lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
  return lines + ["| " + " | ".join(str(c) for c in row) + " |" for row in rows] + [""]


def _targets(records) -> list[str]:
  return sorted({r.backend for r in aot_records(records)})


def findings(records: Sequence[Record]) -> list[str]:
  """One line per headline case, dtype and target: razor against remat, then full."""
  lines = []
  for backend in _targets(records):
    target = backend.split(":", 1)[1].upper()
    for model, batch in HEADLINE:
      for dtype in ("float32", "bfloat16"):
        full, remat, razor = (_find(records, model, batch, m, dtype, backend) for m in METHODS)
        if razor is None or remat is None or full is None:
          continue
        m = razor.modeled or {}
        lines.append(
            f"- {target} (compiled, no device), ViT-{model} b{batch} {dtype} compute: Back"
            f" Razor's default ({razor.label}) {_gib(razor.compiled_peak_bytes)} GiB ="
            f" {_x(razor.compiled_peak_bytes, remat.compiled_peak_bytes)}× remat"
            f" ({_gib(remat.compiled_peak_bytes)} GiB),"
            f" {_x(razor.compiled_peak_bytes, full.compiled_peak_bytes, 3)}× full"
            f" ({_gib(full.compiled_peak_bytes)} GiB); modeled step"
            f" {_x(_ms(razor), _ms(remat))}× remat, {_x(_ms(razor), _ms(full))}× full"
            f" ({m.get('launches', 0):,} kernel launches, {m.get('round_trips', 0):,} host"
            f" round trips per step).")
  return lines


def side_by_side(records: Sequence[Record]) -> list[str]:
  """Compiled peak per model, batch and method: each GPU target beside XLA:CPU."""
  aot = aot_records(records)
  if not aot:
    return ["No GPU-compiled records: `python experiments/benchmark.py --gpu_aot` makes them"
            " (the gpu-aot extra, or RAZOR_JAX_GPU_AOT_PATH).", ""]
  lines = ["Made by `python experiments/benchmark.py --gpu_aot` (about an hour on two CPU"
           " cores; the gpu-aot extra, or RAZOR_JAX_GPU_AOT_PATH naming a folder that holds"
           " the CUDA plugin): each step compiled for the GPU described in"
           " `benchmarks/gpu/`, in a process without one.", ""]
  for backend in _targets(records):
    target = backend.split(":", 1)[1].upper()
    rows = []
    for r in (r for r in aot if r.backend == backend):
      full = _find(records, r.model, r.batch, "full", r.dtype, backend)
      remat = _find(records, r.model, r.batch, "remat", r.dtype, backend)
      cpu = _find(records, r.model, r.batch, r.label, r.dtype, "cpu")
      cpu_remat = _find(records, r.model, r.batch, "remat", r.dtype, "cpu")
      cpu_peak = None if cpu is None else cpu.compiled_peak_bytes
      bits = "—" if r.bits_per_element is None else f"{r.bits_per_element:.2f}"
      rows.append([f"ViT-{r.model}", r.batch, r.dtype, r.label, _gib(r.compiled_peak_bytes),
                   _x(r.compiled_peak_bytes, remat and remat.compiled_peak_bytes),
                   _x(r.compiled_peak_bytes, full and full.compiled_peak_bytes, 3), bits,
                   _gib(cpu_peak), _x(cpu_peak, cpu_remat and cpu_remat.compiled_peak_bytes)])
    lines += _table(["model", "batch", "compute", "method", f"{target} compiled (GiB)",
                     "× remat", "× full", "bits / element", "CPU compiled (GiB)",
                     "CPU × remat"], rows)
  lines += ["The CPU column is XLA:CPU's compiled peak of the same step (float32 only; on"
            " CPU, Back Razor runs its token rows in batch slices of 32). Bits per element:"
            " token rows (Elias-Fano positions, 4-bit values) on both.",
            ""]
  return lines


def modeled_table(records: Sequence[Record]) -> list[str]:
  """Modeled step time, its parts, launches and round trips, per case (gpu-aot records)."""
  rows = []
  for r in aot_records(records):
    if not r.modeled:
      continue
    m = r.modeled
    full = _find(records, r.model, r.batch, "full", r.dtype, r.backend)
    remat = _find(records, r.model, r.batch, "remat", r.dtype, r.backend)
    rows.append([f"ViT-{r.model}", r.batch, r.dtype, r.label, f"{m['time_s'] * 1e3:.1f}",
                 f"{m['arithmetic_s'] * 1e3:.1f}", f"{m['bytes_s'] * 1e3:.1f}",
                 f"{m['launch_s'] * 1e3:.1f}", f"{m['round_trip_s'] * 1e3:.1f}",
                 _x(_ms(r), _ms(remat)), _x(_ms(r), _ms(full)), f"{m['launches']:,}",
                 f"{m['round_trips']:,}",
                 f"{m['fusions']} / {m['while_loops']} ({m['unknown_trip_loops']}) /"
                 f" {m['conditionals']}"])
  if not rows:
    return []
  return _table(["model", "batch", "compute", "method", "modeled (ms)", "arithmetic",
                 "bytes", "launches (ms)", "round trips (ms)", "× remat", "× full",
                 "kernel launches", "host round trips",
                 "fusions / loops (unknown trips) / conditionals"], rows)


def assumptions(constants: gpu_time.Constants = gpu_time.H200) -> list[str]:
  """The time model's assumptions and constants, as the table's preamble."""
  c = constants
  rates = ", ".join(f"{d} {t:g}" for d, t in c.tensor_tflops)
  return [
      "The modeled step prices the GPU-optimized HLO of the compiled step"
      " (`benchmarks/gpu_time.py`; constants in `gpu_time.Constants`):",
      "",
      f"- each gemm/convolution at the tensor-core rate of its operand dtype ({rates}"
      f" TFLOP/s dense; float32 runs as TF32) × {c.gemm_efficiency:g}; each other kernel"
      f" at {c.alu_tops:g} T simple ops/s × {c.alu_efficiency:g} over what it computes;",
      f"- every kernel's operands and results at {c.hbm_tbps:g} TB/s HBM ×"
      f" {c.hbm_efficiency:g}; a fused operand that is only sliced counts as the slice;",
      "  a kernel costs the larger of its arithmetic and its bytes;",
      f"- {c.launch_us:g} µs per kernel launched, loops multiplied by their trip counts;",
      f"- {c.round_trip_us:g} µs per host round trip: a conditional, or an iteration of a"
      f" loop of unknown trip count (counted as {c.unknown_trip_count}), reads its predicate"
      " on the host (no CUDA-graph command buffers assumed);",
      "- nothing overlaps and caches are ignored: compare the methods of one case; the"
      " absolute figures await calibration on a real GPU (`experiments/gpu_check.sh`).",
      "",
      "One consequence to check first on a GPU: the model puts remat 0.7-0.8× full"
      " fine-tuning, because full fine-tuning's backward kernels read every saved"
      " activation from HBM while remat's recomputed ones stay inside fused kernels"
      " (fewer bytes, a little more gemm time). Back Razor's time over remat's is bytes"
      " (its passes over each activation to select and pack) and launches (about twice"
      " remat's): launches weigh most at small sizes, bytes at ViT-L/16 batch 128.",
      "",
      "Passes the selection makes over each activation it packs (read from the optimized"
      " HLO of ViT-B/16 b32): on the GPU (token rows), one fused pass builds a 32-bit key"
      " per element (bfloat16 magnitude above reversed position), one sort per row kernel"
      " orders the keys, one pass gathers the kept values and writes the packed row"
      " (Elias-Fano positions, 4-bit values), and a sort of the K kept positions puts them"
      " in order: 16 sort ops in the scanned block (8 packed activations, 2 sorts each;"
      " executed once per block), no data-dependent loop and no conditional. On CPU the"
      " same rows are found by a 15-pass bit search per row (one compare-and-count pass"
      " per bit of the bfloat16 magnitude). With per-sample groups (`granularity="
      "\"sample\"`) a strided sample brackets the threshold, one counting pass marks"
      " the candidates, the exact search runs over the candidates (about 2% of the"
      " group), and a whole-group search of 15-31 passes runs only when the bracket"
      " misses.",
      "",
      "Compiled from this CPU-only machine, the process's backend is \"cpu\", so the GPU"
      " targets set what resolves by backend to the GPU's choice: batch_chunk 0 (each"
      " record's `settings`; records made before token rows were the default everywhere"
      " also name granularity \"token\").",
      ""]


def settings_note(records: Sequence[Record]) -> str:
  seen = {tuple(sorted((r.settings or {}).items())) for r in aot_records(records)}
  return "; ".join(", ".join(f"{k}={v}" for k, v in s) for s in sorted(seen) if s)
