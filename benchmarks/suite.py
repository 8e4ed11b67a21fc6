"""Which cases to measure how (a Plan), and running a plan into Records.

Five kinds of measurement, each on its own list of cases:

  compiled  XLA's memory analysis of the donated train step (compiling only) and the
            bits per element of the packed residuals (tracing only): any size, any backend;
  measured  the peak of a fresh process running the step (see benchmarks.child): small ones;
  timed     groups of one model and batch whose methods are timed in turns (benchmarks.measure);
  cosine    per-layer gradient cosine against exact gradients on the same batch;
  gpu_aot   compiled for a described GPU without one (benchmarks.gpu_aot): XLA:GPU's
            memory analysis and the modeled step time of its HLO (benchmarks.gpu_time).
"""
from __future__ import annotations

import dataclasses
import os
import statistics
import time
from typing import Callable, Optional, Sequence

import jax

from benchmarks import child, gpu_aot, measure
from benchmarks import step as bench_step
from benchmarks.cases import (ALL_METHODS, DEMO, FULL, MODELS, RAZOR_DEFAULT, REMAT, Case,
                              Method)
from benchmarks.records import Record

RAZOR_90 = Method("razor", 0.9)  # the paper's ratio, with the default policy's formats
RAZOR_SAMPLE_90 = Method("razor_sample", 0.9)
HEADLINE_METHODS = (FULL, REMAT, RAZOR_DEFAULT)
BATCHES = (1, 8, 32, 128)
DEMO_BATCH = 64  # the demo config's batch


@dataclasses.dataclass(frozen=True)
class Plan:
  compiled: tuple = ()
  measured: tuple = ()
  timed: tuple = ()  # tuples of cases sharing model and batch
  cosine: tuple = ()
  rounds: int = 5  # timed rounds per group, after one warm-up round
  child_steps: int = 3  # steps each measuring process runs (the first is not timed)
  # Step-time ratios from the measuring processes' own times, for backends where a
  # process per case times as steadily as turns do (GPUs); CPUs use `timed`.
  ratios_from_children: bool = False
  demo_checkpoint: Optional[str] = None  # pretrained demo ViT for its gradient cosines
  child_timeout_s: float = 1800.0
  gpu_aot: tuple = ()  # cases compiled for gpu_target, one process per model/batch/dtype
  gpu_target: str = "h200"  # a device description in benchmarks/gpu/
  hlo_dir: Optional[str] = None  # where to keep the GPU-optimized HLO of each gpu_aot case


def _grid(models, batches, methods, **kwargs) -> tuple:
  return tuple(Case(m, b, meth, **kwargs) for m in models for b in batches for meth in methods)


def _groups(cases) -> tuple:
  groups = {}
  for c in cases:
    groups.setdefault((c.model, c.batch, c.dtype, c.image_size), []).append(c)
  return tuple(tuple(g) for g in groups.values())


def full_plan(demo_checkpoint: Optional[str] = None) -> Plan:
  """Everything the committed results hold; about an hour on two CPU cores."""
  demo = _grid([DEMO], [8, DEMO_BATCH], ALL_METHODS)
  small = (_grid(["Ti/16"], [1, 8, 32], ALL_METHODS) + _grid(["S/16"], [1, 8], ALL_METHODS)
           + _grid(["B/16"], [1, 8], HEADLINE_METHODS + (RAZOR_SAMPLE_90,))
           + _grid([DEMO], [DEMO_BATCH], ALL_METHODS))
  razor = [m for m in ALL_METHODS if not m.exact]
  cosine = (_grid([DEMO], [DEMO_BATCH], (REMAT, *razor)) + _grid(["Ti/16"], [8], razor)
            + _grid(["B/16"], [8], (RAZOR_DEFAULT, RAZOR_90, RAZOR_SAMPLE_90)))
  # One size where the saving matters, measured without full fine-tuning's 10 GiB.
  larger = _grid(["B/16"], [32], (REMAT, RAZOR_DEFAULT))
  return Plan(compiled=_grid(MODELS, BATCHES, ALL_METHODS) + demo, measured=small + larger,
              timed=_groups(small), cosine=cosine, demo_checkpoint=demo_checkpoint)


def quick_plan(demo_checkpoint: Optional[str] = None) -> Plan:
  """A few minutes on two idle CPU cores: full, remat and the default razor of the demo ViT and
  ViT-Ti/16 at batch 8."""
  cases = _grid([DEMO], [DEMO_BATCH], HEADLINE_METHODS) + _grid(["Ti/16"], [8], HEADLINE_METHODS)
  return Plan(compiled=cases, measured=cases, timed=_groups(cases),
              cosine=(Case(DEMO, DEMO_BATCH, RAZOR_DEFAULT),), rounds=3,
              demo_checkpoint=demo_checkpoint)


def gpu_plan(dtype: str = "bfloat16") -> Plan:
  """ViT-L/16 at batch 128 and ViT-B/16 at batch 32 (the GPU-compiled findings' cases),
  full / remat / the default razor / razor@0.9: one process each.

  Each process compiles, reads the device's peak bytes in use, times its steps and
  models the time of the executable it ran; about 30-40 s per case on one H200.
  """
  methods = (RAZOR_DEFAULT, RAZOR_90, REMAT, FULL)
  cases = (_grid(["L/16"], [128], methods, dtype=dtype)
           + _grid(["B/16"], [32], methods, dtype=dtype))
  return Plan(measured=cases, ratios_from_children=True, child_steps=6, child_timeout_s=240)


GPU_AOT_BATCHES = (8, 32, 128)
GPU_AOT_DTYPES = ("float32", "bfloat16")


def gpu_aot_plan(target: str = "h200", hlo_dir: Optional[str] = None) -> Plan:
  """Every ViT at batch 8, 32 and 128, float32 and bfloat16 compute, full / remat /
  the default razor and razor@0.9, compiled for `target` without a GPU; 15-60 s a case
  on two CPU cores."""
  cases = [c for dtype in GPU_AOT_DTYPES
           for c in _grid(MODELS, GPU_AOT_BATCHES, HEADLINE_METHODS + (RAZOR_90,), dtype=dtype)]
  # The findings' cases first: an interrupted sweep has what the README leads with.
  first = lambda c: (c.model, c.batch) not in (("L/16", 128), ("B/16", 32))
  return Plan(gpu_aot=tuple(sorted(cases, key=first)), gpu_target=target, hlo_dir=hlo_dir)


def _say(line: str):
  print(line, flush=True)


class _Records:
  """Records by case, created on first touch."""

  def __init__(self, backend: str, device: str):
    self.backend, self.device = backend, device
    self.by_case: dict[Case, Record] = {}

  def __getitem__(self, case: Case) -> Record:
    if case not in self.by_case:
      self.by_case[case] = Record.for_case(case, self.backend, device=self.device)
    return self.by_case[case]


def run(plan: Plan, *, say: Callable[[str], None] = _say, deadline_s: Optional[float] = None,
        compilation_cache: Optional[str] = None,
        on_progress: Optional[Callable[[list[Record]], None]] = None) -> list[Record]:
  """Measures `plan` in this process (and children); returns one Record per case.

  A case that fails (out of memory, a timeout) keeps None for what it could not give
  and the run goes on; `deadline_s` (seconds from now) skips what would start later.
  `compilation_cache`: a directory where this process and its children share executables
  (this process keeps using it afterwards: jax sets its cache up once).
  `on_progress(records so far)` is called after each measurement, e.g. to save them.
  """
  env = dict(os.environ)
  if compilation_cache:
    env.update(use_compilation_cache(compilation_cache))
  start = time.monotonic()
  late = lambda: deadline_s is not None and time.monotonic() - start > deadline_s

  def child_timeout() -> float:
    if deadline_s is None:
      return plan.child_timeout_s
    return max(min(plan.child_timeout_s, deadline_s - (time.monotonic() - start)), 1.0)

  records = _Records(jax.default_backend(), str(jax.devices()[0].device_kind))
  aot = _Records(gpu_aot.backend_name(plan.gpu_target), gpu_aot.DEVICES[plan.gpu_target])

  def attempt(what: str, fn):
    _try(say, what, fn)
    if on_progress is not None:
      on_progress(list(records.by_case.values()) + list(aot.by_case.values()))

  for case in plan.compiled:
    if late():
      break
    attempt(f"compile {_name(case)}", lambda c=case: _compiled(c, records[c], plan, say))
  for case in plan.measured:
    if late():
      break
    attempt(f"measure {_name(case)}",
            lambda c=case: _measured(c, records[c], plan, say, env, child_timeout()))
  for group in _groups(plan.gpu_aot):
    if late():
      break
    attempt(f"compile {group[0].model} b{group[0].batch} {group[0].dtype} for"
            f" {plan.gpu_target}",
            lambda g=group: _gpu_aot(g, aot, plan, say, env, child_timeout()))
  for group in plan.timed:
    if late():
      break
    attempt(f"time {group[0].model} b{group[0].batch}",
            lambda g=group: _timed(g, records, plan, say))
  if plan.ratios_from_children:
    _ratios_from_children(records)
  for case in plan.cosine:
    if late():
      break
    attempt(f"cosine {_name(case)}", lambda c=case: _cosine(c, records[c], plan, say))
  return list(records.by_case.values()) + list(aot.by_case.values())


def _name(case: Case) -> str:
  return f"{case.model} b{case.batch} {case.method.label} {case.dtype}"


def _try(say, what: str, fn):
  began = time.monotonic()
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except  (one case must not stop the rest)
    say(f"  {what}: FAILED {type(e).__name__}: {str(e)[-600:]}")
  else:
    say(f"  {what}: {time.monotonic() - began:.0f} s")


def _gib(n) -> str:
  return "n/a" if n is None else f"{n / 2**30:.3f} GiB"


def _compiled(case: Case, record: Record, plan: Plan, say):
  reused = any(case in group for group in plan.timed)
  record.compiled_peak_bytes = bench_step.compiled_peak_bytes(case, cache=reused)
  if not reused:
    jax.clear_caches()  # traces of large models add up over a sweep
  record.bits_per_element = bench_step.packed_bits(case)
  bits = "" if record.bits_per_element is None else f", {record.bits_per_element:.2f} bits/elem"
  say(f"{_name(case)}: compiled peak {_gib(record.compiled_peak_bytes)}{bits}")


def use_compilation_cache(directory: str) -> dict:
  """Caches executables in `directory`, here and in the measuring processes (whose
  environment this returns): they then load the step this process compiled."""
  settings = {"jax_compilation_cache_dir": directory,
              "jax_persistent_cache_min_compile_time_secs": 0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  for name, value in settings.items():
    jax.config.update(name, value)
  return {name.upper(): str(value) for name, value in settings.items()}


def _measured(case: Case, record: Record, plan: Plan, say, env, timeout_s: float):
  result = child.run_child(case, steps=plan.child_steps, timeout_s=timeout_s, env=env)
  record.measured_peak_bytes = result["measured_peak_bytes"]
  record.measured_peak_kind = result["peak_kind"]
  if record.compiled_peak_bytes is None:
    record.compiled_peak_bytes = result["compiled_peak_bytes"]
  if record.bits_per_element is None and not case.method.exact:
    record.bits_per_element = bench_step.packed_bits(case)
  if result.get("modeled"):
    record.modeled = result["modeled"]
  if plan.ratios_from_children and result["step_times"]:
    record.step_time_s = statistics.median(result["step_times"])
  say(f"{_name(case)}: measured peak {_gib(record.measured_peak_bytes)}"
      f" ({record.measured_peak_kind}), compiled {_gib(record.compiled_peak_bytes)}")


def _gpu_aot(group: Sequence[Case], records: _Records, plan: Plan, say, env, timeout_s: float):
  # No shared executable cache: a compile-only GPU executable is of no use to anyone.
  env = {k: v for k, v in env.items() if not k.startswith("JAX_COMPILATION_CACHE")}
  results = gpu_aot.run_child(group, plan.gpu_target, timeout_s=timeout_s, env=env,
                              hlo_dir=plan.hlo_dir)
  for case in group:
    result = results.get(case)
    if result is None:
      say(f"{_name(case)}: FAILED to compile for {plan.gpu_target} (see the errors above)")
      continue
    record = records[case]
    record.compiled_peak_bytes = result["compiled_peak_bytes"]
    record.bits_per_element = result["bits_per_element"]
    record.modeled, record.settings = result["modeled"], result["settings"]
    modeled = result["modeled"]
    say(f"{_name(case)} on {plan.gpu_target}: compiled peak {_gib(record.compiled_peak_bytes)},"
        f" modeled {modeled['time_s'] * 1e3:.1f} ms, {modeled['launches']} launches,"
        f" {modeled['round_trips']} round trips (compiled in {result['compile_s']:.0f} s)")
  missing = [c for c in group if c not in results]
  if missing:
    raise RuntimeError(f"{len(missing)} of {len(group)} cases did not compile")


def _timed(group: Sequence[Case], records: _Records, plan: Plan, say):
  times = measure.step_times(group, rounds=plan.rounds)
  medians = {label: statistics.median(t) for label, t in times.items()}
  full = medians.get(FULL.label)
  for case in group:
    record = records[case]
    record.step_time_s = medians[case.method.label]
    record.step_time_ratio = None if full is None else record.step_time_s / full
  say(f"{group[0].model} b{group[0].batch}: " + ", ".join(
      f"{label} {t:.3f} s" for label, t in medians.items()))


def _ratios_from_children(records: _Records):
  for case, record in records.by_case.items():
    full = records.by_case.get(case.replace(method=FULL))
    if record.step_time_s and full is not None and full.step_time_s:
      record.step_time_ratio = record.step_time_s / full.step_time_s


def _cosine(case: Case, record: Record, plan: Plan, say):
  params, batch, data = cosine_inputs(case, plan.demo_checkpoint)
  cosines = measure.grad_cosines(case, params, batch)
  summary = measure.summarize_cosines(cosines)
  record.grad_cosine = cosines
  record.grad_cosine_min, record.grad_cosine_mean = summary["min"], summary["mean"]
  record.grad_cosine_data = data
  say(f"{_name(case)}: grad cosine min {summary['min']:.4f} mean {summary['mean']:.4f}"
      f" over {summary['layers']} parameters")


def cosine_inputs(case: Case, demo_checkpoint: Optional[str]):
  """(params, batch, description): the demo's pretrained ViT on real digits where there is
  one, otherwise a random initialization (with a random head) on random images."""
  mesh = bench_step.single_device_mesh()
  if case.model == DEMO and demo_checkpoint and os.path.exists(demo_checkpoint):
    from benchmarks import demo_data  # pylint: disable=g-import-not-at-top  (TensorFlow)
    params = demo_data.pretrained_params(case, demo_checkpoint)
    return params, demo_data.train_batch(case.batch), (
        "demo checkpoint (its own head) on a digits_demo training batch")
  return (bench_step.random_params(case), bench_step.random_batch(case, mesh),
          "random initialization (random head) on random images")
