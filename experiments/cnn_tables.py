"""The paper's CNN memory tables (appendix Tables 2-5) for ProxylessNAS-Mobile, regenerated.

    python experiments/cnn_tables.py                  # saved-activation bytes (traced, fast)
    python experiments/cnn_tables.py --compiled       # + XLA:CPU compiled peaks (slow)
    python experiments/cnn_tables.py --gpu_aot        # + peaks compiled for the H200
                                                      #   (benchmarks/gpu_aot.py's plugin)

Writes results/cnn_tables.json and results/cnn_tables.md. The accounting is explained in
benchmarks/cnn.py; the paper's own figures are printed beside ours.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cnn  # noqa: E402

MB = 1e6  # TinyTL's profiler reports MB = 1e6 bytes
# (table, batch, method) -> the paper's MB (its "train memory": activations + params)
PAPER = {
    (2, 8, "actnn"): 60, (2, 8, "razor@0.9"): 42,
    (3, 1, "tinytl_b"): 34, (3, 1, "tinytl_lb"): 18, (3, 1, "razor@0.9"): 15,
    (4, 8, "full"): 366, (4, 8, "razor@0.8"): 42,
}
# Table 5: on-device GPU memory, MB: batch -> (full, Back Razor)
PAPER_DEVICE = {8: (1655, 1637), 128: (7393, 6634)}
TABLES = {
    2: (8, ("full", "actnn", "razor@0.9", "razor_sample@0.9", "razor_sample_ef@0.9",
            "tinytl_b", "tinytl_lb")),
    3: (1, ("tinytl_b", "tinytl_lb", "razor@0.9", "razor_sample@0.9", "actnn", "full")),
    4: (8, ("full", "razor@0.8", "razor_sample@0.8")),
}
COMPILED = tuple((batch, ("full", "razor@0.9", "razor_sample@0.9", "actnn"))
                 for batch in (128, 8))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="proxyless_mobile")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--compiled", action="store_true", help="also compile the steps (slow)")
  parser.add_argument("--gpu_aot", action="store_true",
                      help="also compile them for the H200 (deviceless); peaks not"
                           " recompiled are kept from the last --out")
  parser.add_argument("--out", default="results/cnn_tables")
  args = parser.parse_args(argv)
  rows = []
  for table, (batch, methods) in TABLES.items():
    for method in methods:
      case = cnn.CnnCase(args.arch, method, batch, args.image_size)
      act = cnn.saved_activation_bytes(case)
      rows.append(dict(table=table, batch=batch, method=method, activation_bytes=act,
                       paper_total_bytes=cnn.paper_total_bytes(case, act),
                       paper_mb=PAPER.get((table, batch, method))))
      print(rows[-1], flush=True)
  previous = {}
  if os.path.exists(args.out + ".json"):
    with open(args.out + ".json") as f:
      previous = {(r["batch"], r["method"]): r for r in json.load(f).get("compiled_peaks", [])}
  cases = [cnn.CnnCase(args.arch, method, batch, args.image_size)
           for batch, methods in COMPILED for method in methods]
  gpu = {}
  if args.gpu_aot:
    start = time.time()
    gpu = cnn.gpu_compiled_peaks(cases)
    print(f"compiled {len(gpu)} cases for the H200 in {time.time() - start:.0f} s", flush=True)
  peaks = []
  for case in cases:
    row = dict(previous.get((case.batch, case.method),
                            dict(batch=case.batch, method=case.method, compiled_peak_bytes=None)))
    if args.compiled:
      start = time.time()
      row.update(compiled_peak_bytes=cnn.compiled_peak_bytes(case),
                 compile_s=round(time.time() - start))
    if case in gpu:
      row["h200_peak_bytes"] = gpu[case]
    peaks.append(row)
    print(row, flush=True)
  peaks = [r for r in peaks if r.get("compiled_peak_bytes") or r.get("h200_peak_bytes")]
  result = dict(arch=args.arch, image_size=args.image_size, num_classes=102,
                saved_activations=rows, compiled_peaks=peaks)
  os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
  with open(args.out + ".json", "w") as f:
    json.dump(result, f, indent=1)
  with open(args.out + ".md", "w") as f:
    f.write(render(result))


def render(result) -> str:
  lines = [f"# {result['arch']} at {result['image_size']} px, {result['num_classes']} classes",
           "", "Saved activations: bytes the backward keeps (traced gradient, params excluded);"
           " 'paper total' adds params (trainable x4, frozen x1 bytes) as TinyTL's profiler.", "",
           "| table | batch | method | saved activations (MB) | paper-style total (MB) |"
           " paper (MB) |", "|---|---|---|---|---|---|"]
  for r in result["saved_activations"]:
    paper = "" if r["paper_mb"] is None else str(r["paper_mb"])
    lines.append(f"| {r['table']} | {r['batch']} | {r['method']} |"
                 f" {r['activation_bytes'] / MB:.1f} | {r['paper_total_bytes'] / MB:.1f} | {paper} |")
  if result["compiled_peaks"]:
    lines += ["", "Compiled peak of one donated SGD step (memory analysis: arguments + outputs +"
              " temporaries - aliased), on XLA:CPU and compiled for an H200 without one"
              " (`--gpu_aot`); razor@R is the default policy (image rows, 4-bit log values,"
              " Elias-Fano positions), razor_sample@R the original's per-sample groups;"
              " Table 5's on-device GPU figures (full -> Back Razor) beside.", "",
              "| batch | method | XLA:CPU (MB) | H200 compile (MB) | paper device (MB) |",
              "|---|---|---|---|---|"]
    mb = lambda b: "n/a" if b is None else f"{b / MB:.0f}"
    for r in result["compiled_peaks"]:
      full, razor = PAPER_DEVICE.get(r["batch"], (None, None))
      paper = {"full": full, "razor@0.9": razor}.get(r["method"])
      lines.append(f"| {r['batch']} | {r['method']} | {mb(r.get('compiled_peak_bytes'))} |"
                   f" {mb(r.get('h200_peak_bytes'))} | {paper or ''} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
