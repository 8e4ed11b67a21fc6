"""Data sources and TFDS builders behind razor_jax.data.

Importing this package keeps TensorFlow off the GPUs (JAX needs their memory) and
registers the builders that razor_jax ships with TFDS, so `tfds build --imports
razor_jax.datasets digits_demo/pretrain` works too.
"""
import logging
import os

# TensorFlow's C++ INFO lines (CPU features and the like) say nothing useful for
# input pipelines; an explicit setting by the user wins.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")

import tensorflow as tf  # noqa: E402


def _keep_tensorflow_off_gpus() -> None:
  # TensorFlow would otherwise reserve most of every GPU's memory, which JAX needs.
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:
    logging.warning("TensorFlow initialised its devices before razor_jax.datasets was"
                    " imported; it may hold GPU memory that JAX needs. Import"
                    " razor_jax.data before using TensorFlow.")


_keep_tensorflow_off_gpus()

from razor_jax.datasets.digits_demo import DigitsDemo  # noqa: E402

__all__ = ["DigitsDemo"]
