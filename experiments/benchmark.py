"""Memory, step time, bits and gradient fidelity: full fine-tuning vs remat vs Back Razor.

  python experiments/benchmark.py           # regenerates results/ (about an hour, 2 cores)
  python experiments/benchmark.py --quick   # a few minutes: demo ViT and ViT-Ti/16
  python experiments/benchmark.py --render  # README.md and plots from results/*.json
  experiments/gpu_check.sh                  # ViT-B/16 and L/16 at batch 128 on one GPU

Writes results/benchmark.json, results/README.md and two PNG plots (matplotlib: the
`bench` extra). The logic is razor_jax.bench; see razor_jax/bench/cli.py for the flags.
"""
import os
import sys

from razor_jax.bench import cli

HERE = os.path.dirname(os.path.abspath(__file__))

if __name__ == "__main__":
  sys.exit(cli.main(sys.argv[1:], results_dir=os.path.join(HERE, os.pardir, "results"),
                    demo_checkpoint=os.path.join(HERE, "assets", "vit_demo_digits.npz")))
