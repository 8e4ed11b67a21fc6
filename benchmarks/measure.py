"""Running the steps: step times taken round-robin, and gradient fidelity against exact.

Step times on a shared CPU drift with the load of other processes; timing the methods
of one model and batch in turns (full, remat, razor, full, ...) exposes each to the same
drift, so their ratios stay meaningful where absolute times do not.
"""
from __future__ import annotations

import time
from typing import Optional, Sequence

import jax
import numpy as np
from flax import traverse_util

from benchmarks import step as bench_step
from benchmarks.cases import FULL, Case
from razor_jax.models import vit_checkpoint


def step_times(cases: Sequence[Case], *, rounds: int = 5, warmup: int = 1,
               seed: int = 0) -> dict[str, list[float]]:
  """Seconds per step of each case (same model and batch), measured in alternation.

  One TrainState goes through every method's step in turn: the methods share the
  params tree and optimizer, so only one state is alive whatever the number of methods.

  Returns:
    method label -> `rounds` step times (after `warmup` untimed rounds).
  """
  if len({(c.model, c.batch, c.dtype, c.resolution) for c in cases}) != 1:
    raise ValueError("step_times compares methods of one model, batch, dtype and resolution")
  mesh = bench_step.single_device_mesh()
  built = [bench_step.build(c, mesh) for c in cases]
  structure = jax.tree.structure(built[0].abstract)
  if any(jax.tree.structure(b.abstract) != structure for b in built):
    raise ValueError("the methods' train states differ in structure; time them separately")
  state = bench_step.init_state(built[0], seed)
  batch = bench_step.random_batch(cases[0], mesh, seed)
  rng = bench_step.step_rng(mesh)
  times = {c.method.label: [] for c in cases}
  for round_index in range(warmup + rounds):
    for b in built:
      start = time.perf_counter()
      state, metrics = b.compiled(state, batch, rng)
      jax.block_until_ready((state, metrics))
      if round_index >= warmup:
        times[b.case.method.label].append(time.perf_counter() - start)
  return times


def _layer_leaves(tree) -> dict[str, np.ndarray]:
  """Leaves by path; scanned block params are split per layer (encoderblock_{i}/...)."""
  flat = vit_checkpoint.unstack_blocks(traverse_util.flatten_dict(dict(tree), sep="/"))
  return {path: np.asarray(jax.device_get(leaf), np.float64) for path, leaf in flat.items()}


def cosine(a: np.ndarray, b: np.ndarray) -> Optional[float]:
  """Cosine similarity of two arrays; None when either is all zeros."""
  a, b = a.ravel(), b.ravel()
  norm = np.linalg.norm(a) * np.linalg.norm(b)
  return None if norm == 0 else float(np.dot(a, b) / norm)


# Some gradients are zero in exact arithmetic (the key bias: softmax ignores a shift
# shared by all keys) and hold only rounding noise; their cosine says nothing.
NEGLIGIBLE = 1e-6  # of the largest parameter's gradient norm


def exact_and_method_grads(case: Case, params, batch):
  """Gradients of the mean loss for the exact model and for `case`'s method, same batch."""
  exact = bench_step.build_model(case.replace(method=FULL))
  model = bench_step.build_model(case)
  g_exact = jax.jit(jax.grad(bench_step.loss_fn(exact)))(params, batch)
  g_method = jax.jit(jax.grad(bench_step.loss_fn(model)))(params, batch)
  return g_exact, g_method


def grad_cosines(case: Case, params, batch) -> dict[str, Optional[float]]:
  """Per-layer cosine similarity between `case`'s gradients and exact ones.

  None for a parameter whose exact gradient is negligible (see NEGLIGIBLE).
  """
  g_exact, g_method = exact_and_method_grads(case, params, batch)
  exact, method = _layer_leaves(g_exact), _layer_leaves(g_method)
  floor = NEGLIGIBLE * max(np.linalg.norm(g) for g in exact.values())
  return {name: cosine(method[name], g) if np.linalg.norm(g) > floor else None
          for name, g in exact.items()}


def summarize_cosines(cosines: Optional[dict]) -> dict:
  """min / mean / count of the defined per-layer cosines (None where there are none)."""
  values = [v for v in (cosines or {}).values() if v is not None]
  if not values:
    return {"min": None, "mean": None, "layers": 0}
  return {"min": float(np.min(values)), "mean": float(np.mean(values)), "layers": len(values)}
