"""The paper's CNN memory tables (appendix Tables 2-5) for ProxylessNAS-Mobile, regenerated.

    python experiments/cnn_tables.py                  # saved-activation bytes (traced, fast)
    python experiments/cnn_tables.py --compiled       # + XLA:CPU compiled peaks (slow)

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
    2: (8, ("full", "actnn", "razor@0.9", "razor_ef@0.9", "razor_int8@0.9", "razor_rows@0.9",
            "tinytl_b", "tinytl_lb")),
    3: (1, ("tinytl_b", "tinytl_lb", "razor@0.9", "razor_ef@0.9", "razor_rows@0.9", "actnn",
            "full")),
    4: (8, ("full", "razor@0.8", "razor_ef@0.8")),
}
COMPILED = ((128, ("full", "razor@0.9", "actnn")), (8, ("full", "razor@0.9", "actnn")))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--arch", default="proxyless_mobile")
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--compiled", action="store_true", help="also compile the steps (slow)")
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
  peaks = []
  if args.compiled:
    for batch, methods in COMPILED:
      for method in methods:
        start = time.time()
        peak = cnn.compiled_peak_bytes(cnn.CnnCase(args.arch, method, batch, args.image_size))
        peaks.append(dict(batch=batch, method=method, compiled_peak_bytes=peak,
                          compile_s=round(time.time() - start)))
        print(peaks[-1], flush=True)
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
    lines += ["", "Compiled peak of one donated SGD step (XLA:CPU memory analysis); Table 5's"
              " on-device GPU figures (full -> Back Razor) beside.", "",
              "| batch | method | compiled peak (MB) | paper device (MB) |", "|---|---|---|---|"]
    for r in result["compiled_peaks"]:
      full, razor = PAPER_DEVICE.get(r["batch"], (None, None))
      paper = {"full": full, "razor@0.9": razor}.get(r["method"])
      peak = "n/a" if r["compiled_peak_bytes"] is None else f"{r['compiled_peak_bytes'] / MB:.0f}"
      lines.append(f"| {r['batch']} | {r['method']} | {peak} | {paper or ''} |")
  return "\n".join(lines) + "\n"


if __name__ == "__main__":
  main()
