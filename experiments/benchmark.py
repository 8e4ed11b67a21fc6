"""Memory, step time, bits and gradient fidelity: full fine-tuning vs remat vs Back Razor.

  python experiments/benchmark.py           # regenerates results/ (about an hour, 2 cores)
  python experiments/benchmark.py --quick   # a few minutes: demo ViT and ViT-Ti/16
  python experiments/benchmark.py --render  # README.md and plots from results/*.json
  python experiments/benchmark.py --gpu_aot # every ViT compiled for an H200 without one
  experiments/gpu_check.sh                  # ViT-L/16 b128 and B/16 b32 on one real GPU

Writes results/benchmark.json, results/README.md and two PNG plots (matplotlib: the
`bench` extra). The logic is the benchmarks/ folder (python benchmarks/run.py is the
same command); see benchmarks/cli.py for the flags.
"""
import os
import sys

# benchmarks/ is a folder of the checkout, not an installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cli  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(cli.main(sys.argv[1:]))
