"""Transfer accuracy: full fine-tuning vs Back Razor@0.8/0.9/0.95/0.97, 3 seeds, SGD and Adam.

Also Back Razor@0.9 with attention kept exact (benchmarks.accuracy.EXTRA_METHODS).

  python experiments/transfer_accuracy.py            # ~1.5 h on 2 CPU cores; resumes
  python experiments/transfer_accuracy.py --quick    # a smoke run of a few minutes
  python experiments/transfer_accuracy.py --steps 2000 --ratios 0,0.9 --no_extra
                                                     # a longer schedule, added beside
  python experiments/transfer_accuracy.py --config demo_all --ratios 0,0.9 \
      --methods paper@0.9,razor@0.9\ energy --optimizers sgd --seeds 0 --steps 500
                                                     # issue 13's methods, second task

Starts every run from the demo's pretrained ViT (experiments/configs/demo.py) and
writes results/transfer_accuracy.json, then re-renders results/README.md. The logic
is benchmarks/accuracy.py.
"""
import argparse
import os
import sys
import tempfile

# benchmarks/ is a folder of the checkout, not an installed package.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import accuracy, render  # noqa: E402  pylint: disable=wrong-import-position
from razor_jax.train import cli  # noqa: E402  pylint: disable=wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, os.pardir, "results")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--quick", action="store_true",
                      help="60 steps, one seed, full and razor@0.9, SGD; into a temp dir")
  parser.add_argument("--out", help="the JSON to write (default results/transfer_accuracy.json)")
  parser.add_argument("--steps", type=int, default=None,
                      help="training steps per run (default: the demo config's)")
  parser.add_argument("--ratios", default=",".join(map(str, accuracy.PRUNE_RATIOS)),
                      help="comma list of prune ratios; 0 is full fine-tuning")
  parser.add_argument("--optimizers", default=",".join(accuracy.OPTIMIZERS),
                      help="comma list of " + ", ".join(accuracy.OPTIMIZERS))
  parser.add_argument("--seeds", default=",".join(map(str, accuracy.SEEDS)))
  parser.add_argument("--no_extra", action="store_true",
                      help="skip the extra methods (" + ", ".join(accuracy.EXTRA_METHODS) + ")")
  parser.add_argument("--config", default="demo",
                      help="the task's config in experiments/configs: demo (digits 5-9) or"
                           " demo_all (all ten digits); results/transfer_accuracy[_CONFIG].json")
  parser.add_argument("--methods", default="",
                      help="comma list of issue 13's methods instead of the extra ones: "
                           + ", ".join(accuracy.FIDELITY_METHODS))
  args = parser.parse_args(argv)
  methods = [m for m in args.methods.split(",") if m]
  unknown = set(methods) - set(accuracy.FIDELITY_METHODS)
  if unknown:
    parser.error(f"--methods: unknown {sorted(unknown)}; expected some of"
                 f" {list(accuracy.FIDELITY_METHODS)}")
  unknown = set(args.optimizers.split(",")) - set(accuracy.OPTIMIZERS)
  if unknown:
    parser.error(f"--optimizers: unknown {sorted(unknown)}; expected some of"
                 f" {list(accuracy.OPTIMIZERS)}")
  ratios = tuple(float(r) for r in args.ratios.split(","))
  if any(not 0.0 <= r < 1.0 for r in ratios):
    parser.error(f"--ratios: each prune ratio must be in [0, 1), got {args.ratios}")
  base = cli.load_config(args.config, os.path.join(HERE, "configs")).to_dict()
  if args.quick:
    out = args.out or os.path.join(tempfile.gettempdir(), "razor_jax_accuracy_quick.json")
    if os.path.exists(out) and not args.out:
      os.remove(out)
    accuracy.sweep(base, out, prune_ratios=(0.0, 0.9), extra=None, seeds=(0,),
                   optimizers=("sgd",), total_steps=60)
  else:
    name = "transfer_accuracy.json" if args.config == "demo" else (
        f"transfer_accuracy_{args.config}.json")
    out = args.out or os.path.join(RESULTS, name)
    extra = ({m: accuracy.FIDELITY_METHODS[m] for m in methods} if methods
             else None if args.no_extra else accuracy.EXTRA_METHODS)
    accuracy.sweep(base, out, prune_ratios=ratios, extra=extra,
                   seeds=tuple(int(x) for x in args.seeds.split(",")),
                   optimizers=tuple(args.optimizers.split(",")), total_steps=args.steps)
    render.write(os.path.dirname(out))
  print("\n".join(accuracy.load_markdown(out)))
  print(f"wrote {os.path.normpath(out)}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
