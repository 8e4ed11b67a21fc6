"""Compiled peak of one razor train step with policy fields set: XLA:CPU or the H200.

The benchmark's cases carry a method (full, remat, razor@R, razor_sample@R), not a whole
policy. This compiles a razor case's train step (SGD momentum, float32 params) at
`--prune_ratio` (default: the default policy's, 0.8) with `config.policy` fields on top,
one compile per `--policy`, nothing run:

  python -m benchmarks.policy_memory L/16 128 --policy attention=0.8 --policy attention=0.7
      [--dtype bfloat16] [--gpu_aot]

With no `--policy`, the default policy. `--gpu_aot` compiles for the described H200 in a
child process with benchmarks.gpu_aot's environment (the CUDA plugin, the GPU's
choices) and adds the modeled step time; without it, XLA:CPU here. One line per policy:
compiled peak (argument + output + temp - alias), bits per stored element, and on the GPU
the modeled step in ms.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
from typing import Optional, Sequence

from benchmarks import gpu_aot
from benchmarks.cases import Case, Method
from razor_jax.policy import DEFAULT_PRUNE_RATIO


def parse_fields(text: str) -> dict:
  """"attention=0.8,estimator=energy" -> {"attention": 0.8, "estimator": "energy"}.

  Raises:
    ValueError: an item without "=", with what was expected.
  """
  fields = {}
  for item in filter(None, (part.strip() for part in text.split(","))):
    name, sep, value = item.partition("=")
    if not sep or not name:
      raise ValueError(f"--policy items are field=value (e.g. attention=0.8), got {item!r}")
    try:
      fields[name] = float(value)
    except ValueError:
      fields[name] = value
  return fields


def policy_config(case: Case, fields: dict, gpu: bool):
  """`case`'s train config (the GPU's choices with `gpu`) with `fields` in config.policy.

  Raises:
    ValueError: a field config.policy does not have, naming the ones it has.
  """
  config = gpu_aot.target_config(case) if gpu else case.config()
  with config.unlocked():
    for name, value in fields.items():
      if name not in config.policy:
        raise ValueError(f"config.policy has no field {name!r}; it has"
                         f" {sorted(config.policy.keys())}")
      setattr(config.policy, name, value)
  return config


def compile_one(case: Case, fields: dict, mesh, gpu: bool) -> dict:
  config = policy_config(case, fields, gpu)
  if gpu:
    result = gpu_aot.compile_case(case, mesh, "h200", config=config)
    return {"policy": fields, "compiled_peak_bytes": result["compiled_peak_bytes"],
            "bits_per_element": result["bits_per_element"],
            "modeled_ms": 1e3 * result["modeled"]["time_s"]}
  from benchmarks import step as bench_step  # pylint: disable=g-import-not-at-top
  from razor_jax import memory  # pylint: disable=g-import-not-at-top
  from razor_jax.train import setup as train_setup  # pylint: disable=g-import-not-at-top
  model = train_setup.build_model(config, case.num_classes)
  _, _, compiled = train_setup.compile_step(model, config, mesh)
  return {"policy": fields, "compiled_peak_bytes": memory.compiled_memory(compiled).peak_bytes,
          "bits_per_element": bench_step.packed_bits(case, config)}


def line(result: dict, backend: str) -> str:
  text = (f"{backend} policy {json.dumps(result['policy'])}: compiled peak"
          f" {result['compiled_peak_bytes'] / 2**30:.3f} GiB,"
          f" {result['bits_per_element']:.2f} bits per stored element")
  if "modeled_ms" in result:
    text += f", modeled step {result['modeled_ms']:.0f} ms"
  return text


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("model", help="a ViT variant, e.g. L/16 or B/16")
  parser.add_argument("batch", type=int)
  parser.add_argument("--policy", action="append", default=[],
                      help="field=value[,field=value] of config.policy; repeat for more")
  parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  parser.add_argument("--prune_ratio", type=float, default=DEFAULT_PRUNE_RATIO,
                      help="the case's ratio, under the --policy fields (0.9: the paper's)")
  parser.add_argument("--gpu_aot", action="store_true", help="compile for the H200")
  parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  try:
    policies = [parse_fields(p) for p in args.policy] or [{}]
    case = Case(args.model, args.batch, Method("razor", args.prune_ratio), args.dtype)
    for fields in policies:  # an unknown model or field fails here, before any compile
      policy_config(case, fields, gpu=False)
  except ValueError as e:
    parser.error(str(e))
  if args.gpu_aot and not args.child:
    # The plugin is a compiler only: it needs its own environment (benchmarks.gpu_aot).
    argv = list(sys.argv[1:] if argv is None else argv) + ["--child"]
    return subprocess.run([sys.executable, "-m", "benchmarks.policy_memory", *argv],
                          env=gpu_aot.child_env(), check=False).returncode
  from benchmarks import step as bench_step  # pylint: disable=g-import-not-at-top
  mesh = gpu_aot.topology_mesh("h200") if args.gpu_aot else bench_step.single_device_mesh()
  backend = "H200 compile" if args.gpu_aot else "XLA:CPU"
  for fields in policies:
    print(line(compile_one(case, fields, mesh, args.gpu_aot), backend), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
