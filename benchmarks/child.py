"""Measured peak memory of one case, in a fresh process: `python -m benchmarks.child CASE`.

CASE is a Case as JSON. The process compiles the step, runs it on a fresh state and
prints one line `RESULT {...}` with

  measured_peak_bytes  GPU/TPU: the allocator's peak_bytes_in_use over the whole run.
                       CPU ("rss"): the peak resident size while the steps run, less
                       the resident size before the train state was created (imports,
                       runtime, compiled programs): state, batch, temporaries, and any
                       memory the runtime keeps between steps. The kernel's high-water
                       mark is reset after compiling, so the compiler is not counted;
  peak_kind            "device_peak_bytes_in_use" or "rss";
  max_rss_bytes        ru_maxrss of the whole process (imports and compiler included);
  step_times           seconds per step after the first;
  compiled_peak_bytes  XLA's figure for the same executable;
  modeled              GPU: the modeled step time of that executable (benchmarks.gpu_time).

A fresh process per case is what makes the peak belong to that case alone: both the
allocator's peak and ru_maxrss only ever grow within a process. `run_child` also sets
glibc's mmap threshold, so that freed large buffers go back to the system at once and
the resident size follows what is really in use (the growth of resident memory from a
step's start undercounts: the runtime keeps part of a step's buffers for the next).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import re
import resource
import subprocess
import sys
import time
from typing import Optional

import jax

from benchmarks import step as bench_step
from benchmarks.cases import Case
from razor_jax.memory import device_peak_bytes

RESULT_PREFIX = "RESULT "
_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_CLEAR_REFS = "/proc/self/clear_refs"


def _status_kib(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status", encoding="ascii") as f:
      match = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
  except OSError:
    return None
  return int(match.group(1)) if match else None


def _reset_high_water_mark() -> bool:
  """Linux: writing 5 to clear_refs resets VmHWM to the current resident size."""
  try:
    with open(_CLEAR_REFS, "w", encoding="ascii") as f:
      f.write("5")
    return True
  except OSError:
    return False


def measure(case_json: dict, steps: int = 3) -> dict:
  case = Case.from_json(case_json)
  built = bench_step.build(case)
  memory = built.memory
  on_cpu = jax.default_backend() == "cpu"
  if on_cpu:
    # A first state compiles the initialization's programs; the compiler's memory that
    # the process keeps afterwards is not the step's.
    bench_step.init_state(built)
    gc.collect()
  baseline_kib = _status_kib("VmRSS")
  state = bench_step.init_state(built)
  batch = bench_step.random_batch(case, built.mesh)
  rng = bench_step.step_rng(built.mesh)
  reset = on_cpu and _reset_high_water_mark()

  times = []
  for _ in range(max(steps, 2)):
    start = time.perf_counter()
    state, metrics = built.compiled(state, batch, rng)
    jax.block_until_ready((state, metrics))
    times.append(time.perf_counter() - start)
  loss = float(metrics["loss"])

  if on_cpu:
    peak_kib = _status_kib("VmHWM")
    measured = None
    if reset and baseline_kib is not None and peak_kib is not None:
      measured = (peak_kib - baseline_kib) * 1024
    kind = "rss"
  else:
    measured, kind = device_peak_bytes(), "device_peak_bytes_in_use"
  modeled = None
  if jax.default_backend() == "gpu":
    # The time model on the executable that ran, so a GPU run calibrates it.
    from benchmarks import gpu_time  # pylint: disable=g-import-not-at-top
    modeled = gpu_time.estimate(built.compiled.as_text()).to_json()
  return {"case": case.to_json(), "backend": jax.default_backend(), "modeled": modeled,
          "device": str(jax.devices()[0].device_kind),
          "measured_peak_bytes": measured, "peak_kind": kind,
          "max_rss_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
          "step_times": times[1:], "loss": loss,
          "compiled_peak_bytes": None if memory is None else memory.peak_bytes}


def run_child(case, *, steps: int = 3, timeout_s: float = 1800, env=None) -> dict:
  """Runs `measure` for `case` (a Case) in a new Python process and returns its result.

  Raises:
    RuntimeError: the child failed (its stderr's tail is in the message), e.g. killed
      for memory, or produced no result line.
  """
  env = dict(os.environ if env is None else env)
  env.setdefault("MALLOC_MMAP_THRESHOLD_", str(64 * 1024))
  # benchmarks/ is a folder of the checkout, not an installed package.
  env["PYTHONPATH"] = os.pathsep.join(filter(None, [_ROOT, env.get("PYTHONPATH")]))
  cmd = [sys.executable, "-m", "benchmarks.child", json.dumps(case.to_json()),
         "--steps", str(steps)]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, env=env,
                        check=False)
  for line in proc.stdout.splitlines()[::-1]:
    if line.startswith(RESULT_PREFIX):
      return json.loads(line[len(RESULT_PREFIX):])
  tail = (proc.stderr or proc.stdout)[-2000:]
  raise RuntimeError(f"measuring {case.to_json()} failed (exit status {proc.returncode}):\n{tail}")


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("case", help="a Case as JSON")
  parser.add_argument("--steps", type=int, default=3)
  args = parser.parse_args(argv)
  result = measure(json.loads(args.case), args.steps)
  print(RESULT_PREFIX + json.dumps(result), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
