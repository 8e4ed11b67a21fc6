"""Real inputs for the demo ViT's gradient fidelity: its pretrained params and a digits batch.

Kept apart from the rest of the benchmark because reading the dataset imports TensorFlow.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from razor_jax import data
from benchmarks import step as bench_step
from benchmarks.cases import Case
from razor_jax.models.vit import load_pretrained

DATASET = "digits_demo"


def pretrained_params(case: Case, checkpoint: str):
  """The demo checkpoint with its own head (five classes, like the fine-tuning task).

  A new zero head would make every other gradient zero at the first step.
  """
  model = bench_step.build_model(case)
  init = jax.eval_shape(lambda: bench_step.init_params(model, case))
  return load_pretrained(checkpoint, init, keep_head=True)


def train_batch(batch_size: int, seed: int = 0) -> dict:
  """The first augmented training batch of digits_demo (32 px, as the demo trains)."""
  batch = next(iter(data.train_batches(DATASET, batch_size=batch_size, image_size=32, seed=seed)))
  return {k: jnp.asarray(np.asarray(v)) for k, v in batch.items()}
