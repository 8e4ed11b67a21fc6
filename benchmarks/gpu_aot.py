"""A case's train step compiled for a GPU that is not here (deviceless ahead-of-time).

With the CUDA PJRT plugin importable (`pip install ".[gpu-aot]"`, or a `pip --target`
folder named by RAZOR_JAX_GPU_AOT_PATH), jax describes a GPU from a GpuTargetConfigProto
(benchmarks/gpu/<target>.txtpb) and the train step, given inputs sharded on its
compile-only devices, goes through the whole XLA:GPU pipeline (ptxas included):
`memory_analysis()` is XLA:GPU's buffer assignment, and the optimized HLO is what a GPU
would execute, which benchmarks/gpu_time.py prices.

Each measurement runs in a fresh process, `python -m benchmarks.gpu_aot CASES --target T`,
whose environment `child_env` sets up:

  JAX_PLATFORMS=cpu   the process has no GPU; the plugin is only a compiler;
  XLA_FLAGS           --xla_gpu_enable_triton_gemm=false: without a device there is no
                      autotuning, and the default Triton gemm tiling fails on some backward
                      dots of the scanned blocks ("Couldn't find output tile sizes"), so
                      every gemm goes to cuBLAS;
  PYTHONPATH          RAZOR_JAX_GPU_AOT_PATH first, where the plugin is kept out of the
                      main environment (installed into it, every jax import in that
                      environment looks for a GPU and prints CUDA errors).

The process's backend is "cpu", so what resolves by backend is set to the GPU's choice
(`GPU_SETTINGS`): Back Razor's granularity and the ViT's batch slice. The records say so.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Optional, Sequence

from benchmarks.cases import Case

ENV_PATH = "RAZOR_JAX_GPU_AOT_PATH"  # a `pip --target` folder holding the CUDA plugin
GPU_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "gpu")
TARGETS = ("h200",)  # device descriptions in benchmarks/gpu/<name>.txtpb
DEVICES = {"h200": "NVIDIA H200 (compiled, no device)"}
XLA_FLAG = "--xla_gpu_enable_triton_gemm=false"
RESULT_PREFIX = "RESULT "
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_PLUGIN = os.path.join("jax_plugins", "xla_cuda12")


def backend_name(target: str) -> str:
  """The records' backend for a target: "gpu-aot:h200"."""
  return f"gpu-aot:{target}"


def is_aot(backend: str) -> bool:
  return backend.startswith("gpu-aot:")


def target_description(target: str) -> str:
  """The GpuTargetConfigProto text of `target`.

  Raises:
    ValueError: no description of that name in benchmarks/gpu/.
  """
  path = os.path.join(GPU_DIR, f"{target}.txtpb")
  if target not in TARGETS or not os.path.exists(path):
    raise ValueError(f"unknown GPU target {target!r}; expected one of {TARGETS} (a"
                     f" GpuTargetConfigProto in benchmarks/gpu/<name>.txtpb)")
  with open(path, encoding="utf-8") as f:
    return f.read()


def plugin_location(env: Optional[dict] = None) -> Optional[str]:
  """The folder from which the CUDA plugin would import in a child with `env`, else None.

  Looks in RAZOR_JAX_GPU_AOT_PATH, then on this interpreter's path (an installed extra).
  """
  env = os.environ if env is None else env
  candidates = [p for p in env.get(ENV_PATH, "").split(os.pathsep) if p] + sys.path
  for folder in candidates:
    if os.path.isdir(os.path.join(folder or os.curdir, _PLUGIN)):
      return folder
  return None


def child_env(base: Optional[dict] = None) -> dict:
  """`base` (this process's environment) set up for a deviceless GPU compile.

  Raises:
    RuntimeError: the CUDA plugin is nowhere to be found, with how to install it.
  """
  env = dict(os.environ if base is None else base)
  location = plugin_location(env)
  if location is None:
    raise RuntimeError(
        "the CUDA PJRT plugin is not installed: compiling for a GPU needs"
        ' `pip install ".[gpu-aot]"` (jax-cuda12-plugin of this jax version and'
        " nvidia-cuda-nvcc-cu12), or `pip install --target DIR jax-cuda12-plugin==<jax"
        f' version> nvidia-cuda-nvcc-cu12` and {ENV_PATH}=DIR')
  env["JAX_PLATFORMS"] = "cpu"
  flags = env.get("XLA_FLAGS", "")
  if "xla_gpu_enable_triton_gemm" not in flags:
    env["XLA_FLAGS"] = (flags + " " + XLA_FLAG).strip()
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, location, env.get("PYTHONPATH")]))
  return env


def gpu_settings(batch_chunk: Optional[int] = None) -> dict:
  """What the GPU resolves where an AOT process (backend "cpu") would resolve otherwise;
  `batch_chunk` replaces the GPU's default batch slice (0: none)."""
  from razor_jax import policy  # pylint: disable=g-import-not-at-top
  return {"batch_chunk": policy.auto_batch_chunk("gpu") if batch_chunk is None else batch_chunk}


def target_config(case: Case, batch_chunk: Optional[int] = None):
  """`case`'s train config with the GPU's choices in place of the backend's."""
  config = case.config()
  config.model.batch_chunk = gpu_settings(batch_chunk)["batch_chunk"]
  return config


def topology_mesh(target: str):
  """A one-device mesh on the compile-only devices of `target`."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  from razor_jax.train import sharding  # pylint: disable=g-import-not-at-top
  topology = topologies.get_topology_desc(platform="cuda", target_config=target_description(target),
                                          topology="1x1x1")
  return sharding.make_mesh(1, 1, devices=topology.devices)


def compile_case(case: Case, mesh, target: str, hlo_dir: Optional[str] = None,
                 batch_chunk: Optional[int] = None, config=None) -> dict:
  """Compiles `case`'s step on `mesh`; its memory, modeled time and settings as a dict.

  `config` replaces `target_config(case, batch_chunk)` (benchmarks.policy_memory sets
  policy fields on it).
  """
  from benchmarks import gpu_time  # pylint: disable=g-import-not-at-top
  from benchmarks import step as bench_step  # pylint: disable=g-import-not-at-top
  from razor_jax import memory  # pylint: disable=g-import-not-at-top
  from razor_jax.train import setup as train_setup  # pylint: disable=g-import-not-at-top
  config = target_config(case, batch_chunk) if config is None else config
  began = time.monotonic()
  model = train_setup.build_model(config, case.num_classes)
  _, _, compiled = train_setup.compile_step(model, config, mesh)
  compile_s = time.monotonic() - began
  analysis = memory.compiled_memory(compiled)
  hlo = compiled.as_text()
  if hlo_dir:
    os.makedirs(hlo_dir, exist_ok=True)
    name = f"{case.model.replace('/', '')}_b{case.batch}_{case.method.label}_{case.dtype}.hlo.txt"
    with open(os.path.join(hlo_dir, name), "w", encoding="utf-8") as f:
      f.write(hlo)
  return {"case": case.to_json(), "backend": backend_name(target), "device": DEVICES[target],
          "compiled_peak_bytes": analysis.peak_bytes, "temp_bytes": analysis.temp_bytes,
          "modeled": gpu_time.estimate(hlo).to_json(),
          "settings": {"granularity": config.policy.granularity,
                       "batch_chunk": config.model.batch_chunk},
          "bits_per_element": bench_step.packed_bits(case, config), "compile_s": compile_s}


def child_results(module_args: Sequence[str], what: str, *, timeout_s: float = 3600,
                  env: Optional[dict] = None) -> list[dict]:
  """The RESULT lines of `python -m <module_args>` run with `child_env`, as dicts.

  Raises RuntimeError with the child's stderr tail when no result came back (`what` names
  what was compiled).
  """
  proc = subprocess.run([sys.executable, "-m", *module_args], capture_output=True, text=True,
                        timeout=timeout_s, env=child_env(env), check=False)
  results = [json.loads(line[len(RESULT_PREFIX):]) for line in proc.stdout.splitlines()
             if line.startswith(RESULT_PREFIX)]
  if not results:
    tail = (proc.stderr or proc.stdout)[-2000:]
    raise RuntimeError(f"compiling {what} failed (exit status {proc.returncode}):\n{tail}")
  return results


def run_child(cases: Sequence[Case], target: str = "h200", *, timeout_s: float = 3600,
              env: Optional[dict] = None, hlo_dir: Optional[str] = None) -> dict:
  """Compiles `cases` for `target` in one fresh process; {case: result dict}.

  A case the child could not compile is absent; its error is in the stderr tail, which
  the RuntimeError carries when no case came back.
  """
  target_description(target)  # an unknown target fails here, not in the child
  args = ["benchmarks.gpu_aot", "--target", target, json.dumps([c.to_json() for c in cases])]
  if hlo_dir:
    args += ["--hlo_dir", hlo_dir]
  results = child_results(args, f"{[c.to_json() for c in cases]} for {target}",
                          timeout_s=timeout_s, env=env)
  return {Case.from_json(result["case"]): result for result in results}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("cases", help="a JSON list of Cases")
  parser.add_argument("--target", default="h200", choices=TARGETS)
  parser.add_argument("--hlo_dir", help="also write each optimized HLO module here")
  parser.add_argument("--batch_chunk", type=int,
                      help="the ViT's batch slice instead of the GPU default (0: none)")
  args = parser.parse_args(argv)
  if os.environ.get("JAX_PLATFORMS") != "cpu":
    raise SystemExit("run through benchmarks.gpu_aot.run_child (or with JAX_PLATFORMS=cpu and"
                     f" {XLA_FLAG} in XLA_FLAGS): this process compiles for a GPU it lacks")
  import jax  # pylint: disable=g-import-not-at-top
  mesh = topology_mesh(args.target)
  failed = 0
  for case_json in json.loads(args.cases):
    case = Case.from_json(case_json)
    try:
      result = compile_case(case, mesh, args.target, args.hlo_dir, args.batch_chunk)
    except Exception as e:  # pylint: disable=broad-except  (one case must not stop the rest)
      failed += 1
      print(f"FAILED {case_json}: {type(e).__name__}: {str(e)[-600:]}", file=sys.stderr,
            flush=True)
    else:
      print(RESULT_PREFIX + json.dumps(result), flush=True)
    jax.clear_caches()  # traces of large models add up over a group
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
