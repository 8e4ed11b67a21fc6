"""The train step of a benchmark case: compiled by the trainer's own code, then run or traced.

`build` goes through `razor_jax.train.setup.compile_step`, the function `train.run` uses,
so a compiled figure here is what a fine-tuning run with the same config compiles to.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Optional
from unittest import mock

import jax
import jax.numpy as jnp
import numpy as np

from razor_jax import memory as memory_analysis
from razor_jax import packed
from benchmarks.cases import Case
from razor_jax.memory import CompiledMemory
from razor_jax.train import setup as train_setup
from razor_jax.train import sharding
from razor_jax.train import step as train_step


@dataclasses.dataclass
class Built:
  """A case's model, optimizer and compiled step (state donated, as in training)."""
  case: Case
  config: Any
  model: Any
  tx: Any
  abstract: Any  # the TrainState as ShapeDtypeStructs with shardings
  compiled: Any
  mesh: Any

  @property
  def memory(self) -> Optional[CompiledMemory]:
    """XLA's memory analysis of the step; None where the backend gives none."""
    try:
      return memory_analysis.compiled_memory(self.compiled)
    except RuntimeError:
      return None


def single_device_mesh():
  # One device even where tests split the CPU into eight: the figures are per device.
  return sharding.make_mesh(1, 1)


def build_model(case: Case):
  """The ViT of `case` (Back Razor per its method), as the trainer builds it."""
  return train_setup.build_model(case.config(), case.num_classes)


@functools.lru_cache(maxsize=32)
def _build(case: Case, mesh, num_classes: Optional[int], batch_chunk: Optional[int]) -> Built:
  config = case.config()
  if batch_chunk is not None:
    config.model.batch_chunk = batch_chunk
  model = train_setup.build_model(config, num_classes or case.num_classes)
  tx, abstract, compiled = train_setup.compile_step(model, config, mesh)
  return Built(case, config, model, tx, abstract, compiled, mesh)


def build(case: Case, mesh=None, *, cache: bool = True, num_classes: Optional[int] = None,
          batch_chunk: Optional[int] = None) -> Built:
  """The compiled step of `case`; kept for reuse (compiling dominates small benchmarks)
  unless `cache` is False (a sweep over large models that compiles each once).

  `num_classes` and `batch_chunk` replace the case's head size and the ViT's samples per
  block slice (experiments/vit_memory.py); the step is the same otherwise.
  """
  mesh = mesh or single_device_mesh()
  build_fn = _build if cache else _build.__wrapped__
  return build_fn(case, mesh, num_classes, batch_chunk)


def compiled_peak_bytes(case: Case, mesh=None, *, cache: bool = True) -> Optional[int]:
  """argument + output + temp - alias of one donated train step; None without analysis."""
  memory = build(case, mesh, cache=cache).memory
  return None if memory is None else memory.peak_bytes


def random_batch(case: Case, mesh, seed: int = 0) -> dict:
  """Images in [-1, 1] (the pipelines' range) and random labels, laid out as the step expects."""
  rng = np.random.default_rng(seed)
  size = case.resolution
  local = {"image": rng.uniform(-1, 1, (case.batch, size, size, 3)).astype(np.float32),
           "label": rng.integers(0, case.num_classes, case.batch).astype(np.int32),
           "mask": np.ones(case.batch, np.float32)}
  return sharding.global_batch(local, mesh)


def init_state(built: Built, seed: int = 0):
  """A fresh, randomly initialized TrainState for the compiled step."""
  shardings = jax.tree.map(lambda a: a.sharding, built.abstract)
  rng = jax.random.fold_in(jax.random.key(seed), 0)
  return train_setup.init_state(built.model, built.tx, built.config, built.mesh, shardings, rng)


def init_params(model, case: Case, seed: int = 0):
  """`model`'s initialized params for `case`'s image size (wrap in jax.eval_shape for shapes)."""
  image = jnp.zeros((1, case.resolution, case.resolution, 3))
  return model.init(jax.random.key(seed), image, train=False)["params"]


def random_params(case: Case, seed: int = 0):
  """Initialized params with a random head: the zero-initialized head of a fresh model
  would make every other gradient zero, leaving nothing to compare."""
  params = init_params(build_model(case), case, seed)
  kernel = params["head"]["kernel"]
  head = 0.02 * jax.random.normal(jax.random.key(seed + 1), kernel.shape, kernel.dtype)
  return {**params, "head": {**params["head"], "kernel": head}}


def step_rng(mesh):
  return jax.device_put(jax.random.key(0), sharding.replicated(mesh))


def loss_fn(model):
  """Mean cross entropy of `model` on a batch, as a function of its params."""
  def loss(params, batch):
    logits = model.apply({"params": params}, batch["image"], train=True)
    return jnp.mean(train_step.cross_entropy(logits, batch["label"]))
  return loss


def packed_bits(case: Case, config=None) -> Optional[float]:
  """Stored bits per element over every packed residual of the step (element-weighted).

  Traces the gradient (nothing runs) while recording each `packed.pack` result, so
  the figure covers exactly the residuals the model packs. None for exact methods.
  `config` replaces the case's own (a GPU target's granularity, benchmarks.gpu_aot).
  """
  if case.method.exact:
    return None
  model = train_setup.build_model(config or case.config(), case.num_classes)
  image = jax.ShapeDtypeStruct((case.batch, case.resolution, case.resolution, 3), jnp.float32)
  batch = {"image": image, "label": jax.ShapeDtypeStruct((case.batch,), jnp.int32)}
  params = jax.eval_shape(lambda: init_params(model, case))
  seen = []
  original = packed.pack

  def recording(*args, **kwargs):
    result = original(*args, **kwargs)
    seen.append(result)
    return result

  with mock.patch.object(packed, "pack", recording):
    jax.eval_shape(jax.grad(loss_fn(model)), params, batch)
  if not seen:
    return None
  stored = sum(8 * p.nbytes() for p in seen)
  return stored / sum(math.prod(p.shape) for p in seen)
