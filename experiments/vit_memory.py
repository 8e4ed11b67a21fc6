"""Compiled peak memory of one ViT fine-tuning step: full, remat and Back Razor.

  python experiments/vit_memory.py --variant L/16 --batch 128 [--methods full,remat,razor]

The benchmark's step (benchmarks/step.py: the trainer's SGD-momentum step with gradient
clipping, fp32 params, state donated, 224 px, a 100-class head), compiled but not run:
peak = argument + output + temp - alias from XLA's memory analysis, so ViT-L/16 at batch
128 is measured on a CPU machine too. These are the figures of issue 3's memory targets
and of results/benchmark.json (README: full 105.9, remat 10.23, the default razor 6.06 GiB).
"""
import argparse
import os
import sys
import time

# benchmarks/ is a folder of the checkout, not an installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=wrong-import-position
import jax  # noqa: E402

from benchmarks import step as bench_step  # noqa: E402
from benchmarks.cases import RAZOR_DEFAULT, Case, parse_method  # noqa: E402
from razor_jax.models import vit  # noqa: E402

# "razor": the default policy (`Policy()`); "razor@0.9": its formats at the paper's ratio.
METHODS = {"full": "full", "remat": "remat", "razor": RAZOR_DEFAULT.label, "razor@0.9": "razor@0.9"}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="L/16", choices=sorted(vit.VARIANTS))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=None,
                      help="head size; default the benchmark's (100, CIFAR-100 as in the paper)")
  parser.add_argument("--methods", default="full,remat,razor")
  parser.add_argument("--batch_chunk", type=int, default=32)
  args = parser.parse_args()
  names = args.methods.split(",")
  unknown = [name for name in names if name not in METHODS]
  if unknown:
    parser.error(f"unknown method {unknown[0]!r}; expected some of {sorted(METHODS)}")
  print(f"backend={jax.default_backend()} ViT-{args.variant} batch={args.batch}")
  for name in names:
    case = Case(args.variant, args.batch, parse_method(METHODS[name]),
                image_size=args.image_size)
    start = time.time()
    peak = bench_step.build(case, cache=False, num_classes=args.num_classes,
                            batch_chunk=args.batch_chunk).memory
    print(f"{name:6s} compiled peak {peak.peak_bytes / 2**30:7.2f} GiB"
          f"  (temp {peak.temp_bytes / 2**30:.2f} GiB, compiled in {time.time() - start:.0f}s)",
          flush=True)


if __name__ == "__main__":
  main()
