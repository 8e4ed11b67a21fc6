"""`digits_demo`: scikit-learn's handwritten digits as a TFDS image-classification set.

scikit-learn ships 1797 real handwritten digits (8x8 grey levels 0..16) inside its
wheel, so this builder needs no network. Each digit becomes a 32x32 RGB uint8 image,
dark ink on a white background, upsampled with separable bilinear interpolation (an
exact numpy computation, so every machine builds identical bytes).

Configs split the classes, for a pretrain-then-transfer demo:

  digits_demo/pretrain   digits 0-4, labels 0-4
  digits_demo/finetune   digits 5-9, labels 0-4 (label = digit - 5)
  digits_demo/all        digits 0-9, labels 0-9 (a second transfer task, new head)

Each has a deterministic `train` / `test` split: image i of scikit-learn's order goes
to `test` when i % 5 == 4 (20%), otherwise to `train`.
"""
from __future__ import annotations

import dataclasses

import numpy as np
import tensorflow_datasets as tfds

IMAGE_SIZE = 32
_SOURCE_SIZE = 8
_MAX_LEVEL = 16.0  # scikit-learn's digits count ink in 0..16
_TEST_EVERY = 5


@dataclasses.dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  digits: tuple[int, ...] = ()


def _interpolation_matrix(out_size: int, in_size: int) -> np.ndarray:
  """(out, in) weights of bilinear resampling with pixel centres aligned (half-pixel)."""
  centres = (np.arange(out_size) + 0.5) * in_size / out_size - 0.5
  centres = np.clip(centres, 0, in_size - 1)
  low = np.floor(centres).astype(int)
  high = np.minimum(low + 1, in_size - 1)
  frac = centres - low
  weights = np.zeros((out_size, in_size))
  weights[np.arange(out_size), low] += 1 - frac
  weights[np.arange(out_size), high] += frac
  return weights


def to_rgb(digit: np.ndarray, size: int = IMAGE_SIZE) -> np.ndarray:
  """An (8, 8) ink map in 0..16 as a (size, size, 3) uint8 image, dark ink on white."""
  weights = _interpolation_matrix(size, digit.shape[0])
  ink = weights @ (digit / _MAX_LEVEL) @ weights.T
  grey = np.round(255.0 * (1.0 - np.clip(ink, 0.0, 1.0))).astype(np.uint8)
  return np.repeat(grey[..., None], 3, axis=-1)


def is_test(index: int) -> bool:
  return index % _TEST_EVERY == _TEST_EVERY - 1


class DigitsDemo(tfds.core.GeneratorBasedBuilder):
  """scikit-learn's handwritten digits, 32x32 RGB, split by class for transfer learning."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "First release."}
  BUILDER_CONFIGS = [
      DigitsConfig(name="pretrain", digits=(0, 1, 2, 3, 4),
                   description="Digits 0-4 (labels 0-4), to pretrain on."),
      DigitsConfig(name="finetune", digits=(5, 6, 7, 8, 9),
                   description="Digits 5-9 (labels 0-4 = digit - 5), to fine-tune on."),
      # A second transfer task from the same checkpoint: ten classes, a new head, half
      # of them unseen in pretraining (its test images are held out of pretraining too).
      DigitsConfig(name="all", digits=tuple(range(10)),
                   description="All ten digits (label = digit), to fine-tune on."),
  ]

  def _info(self) -> tfds.core.DatasetInfo:
    names = [str(d) for d in self.builder_config.digits]
    return self.dataset_info_from_configs(
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format="png"),
            "label": tfds.features.ClassLabel(names=names),
        }),
        supervised_keys=("image", "label"),
        homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # everything comes from the installed scikit-learn
    return {"train": self._generate_examples(test=False),
            "test": self._generate_examples(test=True)}

  def _generate_examples(self, test: bool):
    try:
      from sklearn.datasets import load_digits
    except ImportError:
      raise ImportError(
          "digits_demo is built from scikit-learn's bundled digits: "
          "`pip install scikit-learn`") from None
    digits = load_digits()
    label_of = {d: i for i, d in enumerate(self.builder_config.digits)}
    for index, (image, digit) in enumerate(zip(digits.images, digits.target)):
      if int(digit) in label_of and is_test(index) == test:
        yield index, {"image": to_rgb(image), "label": label_of[int(digit)]}
