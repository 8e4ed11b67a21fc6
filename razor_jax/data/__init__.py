"""Fine-tuning input pipelines (the `train` extra): TFDS datasets, image folders, an offline demo.

  pipeline.py     dataset names; train_batches / eval_batches (the batches' contract)
  tfds_source.py  TFDS datasets on disk, prepared on first use where that can work
  folder.py       local image folders, ROOT/SPLIT/CLASS/IMAGE
  digits_demo.py  the offline demo dataset, built from scikit-learn's handwritten digits
  preprocess.py   crops, flips and resizing, as TensorFlow functions
  errors.py       DatasetMissingError

Prepare a dataset ahead of time with `python -m razor_jax.data NAME --data_dir DIR`.

Importing this package keeps TensorFlow off the GPUs (JAX needs their memory) and
registers the builders razor_jax ships with TFDS, so `tfds build --imports
razor_jax.data digits_demo/pretrain` works too. The trainer imports it only once a
run needs data.
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
    logging.warning("TensorFlow initialised its devices before razor_jax.data was"
                    " imported; it may hold GPU memory that JAX needs. Import"
                    " razor_jax.data before using TensorFlow.")


_keep_tensorflow_off_gpus()

# pylint: disable=g-import-not-at-top,wrong-import-position
from razor_jax.data.digits_demo import DigitsDemo  # noqa: E402  (registers the builder)
from razor_jax.data.errors import DatasetMissingError  # noqa: E402
from razor_jax.data.pipeline import (  # noqa: E402
    DATASETS, FOLDER_PREFIX, DatasetInfo, dataset_info, eval_batches, num_classes, num_examples,
    prepare, train_batches)

__all__ = [
    "DATASETS", "DatasetInfo", "DatasetMissingError", "DigitsDemo", "FOLDER_PREFIX",
    "dataset_info", "eval_batches", "num_classes", "num_examples", "prepare", "train_batches",
]
