"""Runs the benchmark suite into results/ (the flags: benchmarks/cli.py).

  python benchmarks/run.py           # regenerates results/ (about an hour, 2 cores)
  python benchmarks/run.py --quick   # a few minutes: demo ViT and ViT-Ti/16
  python benchmarks/run.py --render  # README.md and plots from results/*.json

The same as python experiments/benchmark.py.
"""
import os
import sys

# benchmarks/ is a folder of the checkout, not an installed package: import it from the
# checkout's root (in place of this script's folder, whose modules are not top-level).
sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from benchmarks import cli  # noqa: E402  pylint: disable=wrong-import-position

if __name__ == "__main__":
  sys.exit(cli.main(sys.argv[1:]))
