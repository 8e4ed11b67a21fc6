"""The command line of benchmarks/run.py and experiments/benchmark.py.

  (no flag)      the full CPU plan (suite.full_plan) into results/: about an hour on 2 cores
  --quick        the demo ViT and ViT-Ti/16 only, a few minutes, into a temporary folder
  --gpu          ViT-L/16 b128 and ViT-B/16 b32 on the accelerator (suite.gpu_plan)
  --gpu_aot      every ViT at batch 8, 32, 128, float32 and bfloat16, full / remat /
                 razor@0.9, compiled for --target (default h200) without a GPU: XLA:GPU's
                 compiled peak and the modeled step time (suite.gpu_aot_plan); needs the
                 CUDA plugin (the gpu-aot extra, or RAZOR_JAX_GPU_AOT_PATH); about an hour
  --render       only rewrite README.md and the plots from the folder's JSON
  --merge JSON   add the records of another benchmark.json (e.g. from gpu_check.sh), render
  --stages       a comma list of compiled,measured,timed,cosine,gpu_aot to run (default all)
  --methods      a comma list of method names (full,remat,razor,razor_sample) to keep
  --out DIR      where benchmark.json, README.md and the plots go

Each record carries the commit of the razor_jax it measured: run from a clean checkout
(or a `git worktree`) while others edit the library.

New figures replace those of the same model, batch, method, backend, dtype and size in
DIR/benchmark.json; the others stay, so a partial rerun updates only what it measured.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import tempfile
import time
from typing import Optional, Sequence

from benchmarks import records, render, suite, version

STAGES = ("compiled", "measured", "timed", "cosine", "gpu_aot")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RESULTS_DIR = os.path.join(ROOT, "results")
# The offline demo's pretrained ViT: its gradient cosines are measured on real digits.
DEMO_CHECKPOINT = os.path.join(ROOT, "experiments", "assets", "vit_demo_digits.npz")


def parse_args(argv: Optional[Sequence[str]]):
  parser = argparse.ArgumentParser(
      description="Memory, step time, bits and gradient fidelity of full fine-tuning,"
      " remat and Back Razor.")
  mode = parser.add_mutually_exclusive_group()
  mode.add_argument("--quick", action="store_true", help="minutes: demo ViT and ViT-Ti/16")
  mode.add_argument("--gpu", action="store_true", help="ViT-L/16 b128 and B/16 b32 on a GPU")
  mode.add_argument("--gpu_aot", action="store_true",
                    help="compile for a described GPU without one (see --target)")
  mode.add_argument("--render", action="store_true", help="only rewrite README.md and plots")
  mode.add_argument("--merge", metavar="JSON", help="merge another benchmark.json's records"
                    " into --out's, then render")
  parser.add_argument("--out", help="results folder (default: results/, or a temp folder"
                      " for --quick)")
  parser.add_argument("--stages", default=",".join(STAGES), help="comma list of " +
                      ", ".join(STAGES))
  parser.add_argument("--methods", default="full,remat,razor,razor_sample",
                      help="comma list of method names to measure")
  parser.add_argument("--dtype", default="bfloat16", choices=("float32", "bfloat16"),
                      help="compute dtype for --gpu")
  parser.add_argument("--target", default="h200", help="GPU description for --gpu_aot"
                      " (benchmarks/gpu/NAME.txtpb)")
  parser.add_argument("--hlo_dir", help="--gpu_aot: keep each step's optimized HLO here")
  parser.add_argument("--deadline", type=float, default=None,
                      help="seconds after which no new measurement starts")
  parser.add_argument("--no_plots", action="store_true", help="tables only")
  return parser.parse_args(argv)


def _select(plan: suite.Plan, stages: Sequence[str], methods: Sequence[str]) -> suite.Plan:
  """`plan` with only `stages`, and in them only cases of `methods` (names)."""
  keep = lambda cases: tuple(c for c in cases if c.method.name in methods)
  changes = {s: () if s not in stages else keep(getattr(plan, s))
             for s in ("compiled", "measured", "cosine", "gpu_aot")}
  changes["timed"] = () if "timed" not in stages else tuple(
      g for g in (keep(group) for group in plan.timed) if g)
  return dataclasses.replace(plan, **changes)


def main(argv: Optional[Sequence[str]], results_dir: str = RESULTS_DIR,
         demo_checkpoint: str = DEMO_CHECKPOINT) -> int:
  args = parse_args(argv)
  stages = [s for s in args.stages.split(",") if s]
  unknown = set(stages) - set(STAGES)
  if unknown:
    raise SystemExit(f"unknown stages {sorted(unknown)}; expected some of {STAGES}")
  if args.quick:
    out = args.out or os.path.join(tempfile.gettempdir(), "razor_jax_benchmark_quick")
  else:
    out = args.out or results_dir
  command = "python experiments/benchmark.py" + (" --quick" if args.quick else "")
  if args.gpu_aot:
    from benchmarks import gpu_aot  # pylint: disable=g-import-not-at-top
    try:  # an unknown target or a missing plugin fails before anything runs
      gpu_aot.target_description(args.target)
      gpu_aot.child_env()
    except (ValueError, RuntimeError) as e:
      raise SystemExit(str(e)) from None
  path = os.path.join(out, render.BENCHMARK_JSON)
  if args.merge:
    records.save(path, records.merge(records.load(path), records.load(args.merge)))
  elif not args.render:
    if args.gpu:
      plan = suite.gpu_plan(args.dtype)
    elif args.gpu_aot:
      plan = suite.gpu_aot_plan(args.target, args.hlo_dir)
    elif args.quick:
      plan = suite.quick_plan(demo_checkpoint)
    else:
      plan = suite.full_plan(demo_checkpoint)
    plan = _select(plan, stages, args.methods.split(","))
    began = time.monotonic()
    kept = records.load(path)
    # Saved after every measurement, so an interrupted run keeps what it measured.
    commit = version.code_version()

    def save(new):
      for r in new:
        r.commit = commit
      records.save(path, records.merge(kept, new))

    cache = tempfile.mkdtemp(prefix="razor_jax_xla_cache_")
    try:
      new = suite.run(plan, deadline_s=args.deadline, on_progress=save, compilation_cache=cache)
    finally:
      shutil.rmtree(cache, ignore_errors=True)
    save(new)
    print(f"{len(new)} records in {time.monotonic() - began:.0f} s -> {os.path.normpath(path)}")
  for path in render.write(out, command=command, plots=not args.no_plots):
    print(f"wrote {os.path.normpath(path)}")
  return 0
