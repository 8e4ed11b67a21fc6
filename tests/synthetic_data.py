"""A small in-memory stand-in for razor_jax.data: the same API, learnable, deterministic.

Each class is a fixed random pattern; an example is its class pattern plus noise, so a
tiny ViT gets well above chance in a few dozen steps. Batch `step` of the training
stream is a pure function of (seed, step), as razor_jax.data promises.
"""
from __future__ import annotations

import time

import numpy as np


class SyntheticData:

  def __init__(self, classes: int = 4, eval_examples: int = 36, noise: float = 0.5,
               delay_s: float = 0.0, nan_from_step: int | None = None):
    self.classes = classes
    self.eval_examples = eval_examples
    self.noise = noise
    self.delay_s = delay_s  # sleep per training batch: slows a run down enough to kill it
    self.nan_from_step = nan_from_step  # images become NaN from this step on
    self.crop_area_min = "never asked"  # what the trainer passed (the images ignore it)

  def num_classes(self, name, data_dir=None):  # pylint: disable=unused-argument
    return self.classes

  def num_examples(self, name, split, data_dir=None):  # pylint: disable=unused-argument
    return self.eval_examples if split == "test" else 10**6

  def _patterns(self, image_size):
    rng = np.random.default_rng(1234)
    return rng.uniform(-1, 1, (self.classes, image_size, image_size, 3)).astype(np.float32)

  def _examples(self, rng, n, image_size):
    labels = rng.integers(0, self.classes, n).astype(np.int32)
    noise = rng.normal(0, self.noise, (n, image_size, image_size, 3)).astype(np.float32)
    images = np.clip(self._patterns(image_size)[labels] + noise, -1, 1)
    return images, labels

  def train_batches(self, name, *, batch_size, image_size, seed, start_step=0,  # pylint: disable=unused-argument
                    data_dir=None, manual_dir=None, crop_area_min=None):
    self.crop_area_min = crop_area_min
    step = start_step
    while True:
      images, labels = self._examples(np.random.default_rng([seed, step]), batch_size, image_size)
      if self.nan_from_step is not None and step >= self.nan_from_step:
        images = np.full_like(images, np.nan)
      if self.delay_s:
        time.sleep(self.delay_s)
      yield {"image": images, "label": labels, "mask": np.ones(batch_size, np.float32)}
      step += 1

  def eval_batches(self, name, *, batch_size, image_size, data_dir=None, manual_dir=None):  # pylint: disable=unused-argument
    images, labels = self._examples(np.random.default_rng(99), self.eval_examples, image_size)
    for start in range(0, self.eval_examples, batch_size):
      n = min(batch_size, self.eval_examples - start)
      pad = batch_size - n
      yield {"image": np.pad(images[start:start + n], [(0, pad), (0, 0), (0, 0), (0, 0)]),
             "label": np.pad(labels[start:start + n], [(0, pad)]),
             "mask": np.pad(np.ones(n, np.float32), [(0, pad)])}
