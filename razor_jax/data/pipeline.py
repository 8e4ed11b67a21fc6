"""The input pipelines: dataset names, training and evaluation batches.

Dataset names (`DATASETS`; train split / eval split, classes):

  caltech_birds2011   train / test                      200  (CUB-200-2011)
  oxford_flowers102   train+validation / test           102
  cifar10             train / test                       10
  cifar100            train / test                      100
  oxford_iiit_pet     train / test                       37
  food101             train / validation                101
  cars196             train / test                      196  (manual download, see below)
  digits_demo         = digits_demo/finetune
  digits_demo/finetune  train / test  5  digits 5-9 of scikit-learn, labels digit - 5
  digits_demo/pretrain  train / test  5  digits 0-4
  digits_demo/all       train / test  10 all ten digits, label = digit
  folder:PATH         PATH/train/CLASS/IMAGE and PATH/test/CLASS/IMAGE (or validation/, val/)

TFDS datasets are read from `data_dir` (default $TFDS_DATA_DIR, else
~/tensorflow_datasets). One that is missing is prepared there on first use when it
can be: `digits_demo` always (32x32 RGB images made from the digits inside the
scikit-learn wheel, written as TFRecords to DATA_DIR/digits_demo/{pretrain,finetune}/
1.0.0; see razor_jax/data/digits_demo.py); the others from files in `manual_dir`,
or by download after a quick connection test. Otherwise `DatasetMissingError` says
what to do, within seconds rather than after tfds's minutes of retries. `cars196`'s
download links are dead, so it needs `manual_dir`. Prepare ahead of time with
`python -m razor_jax.data NAME [--data_dir DIR] [--manual_dir DIR]`.

Batches are dicts of numpy arrays for this host's rows, B = batch_size // process_count:
{"image": float32 [B, H, W, 3] in [-1, 1], "label": int32 [B], "mask": float32 [B]}.

Training (`train_batches`) reads an endless stream: epoch e is this host's slice of
the split in file order, cut into windows of `shuffle_buffer` examples (one window
when the slice is smaller), each window permuted by a stateless op seeded by (seed,
host, e, window). Epochs follow each other without a gap, and step s takes stream
positions [s*B, (s+1)*B), so batches may straddle epochs. TFDS stores examples in a
hashed (random) order, and folders are read in a hashed order too, so windows mix
classes. The example at position p is augmented (inception crop, flip) with
stateless ops seeded by (seed, host, p). A run that starts at `start_step=k` therefore
gets exactly the batches k, k+1, ... of a run that started at 0, for the same seed
and process count. Evaluation (`eval_batches`) reads the split once in file order,
every host the same number of batches, the last ones padded with mask 0.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Iterator, Optional

import jax
import numpy as np

# After razor_jax.data's __init__, which quiets TensorFlow's start-up and keeps it off
# the GPUs before anything else touches it.
import tensorflow as tf

from razor_jax.data import preprocess, tfds_source
from razor_jax.data.digits_demo import DigitsDemo
from razor_jax.data.folder import FolderSource

FOLDER_PREFIX = "folder:"
DEFAULT_SHUFFLE_BUFFER = 16_384
_FOREVER = 2**62


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """What the pipelines need to know about a dataset."""
  name: str
  train_split: str
  eval_split: str
  num_classes: int
  tfds_name: str = ""  # TFDS builder, "name" or "name/config"; empty for image folders
  image_key: str = "image"
  label_key: str = "label"
  manual_only: bool = False  # the source files cannot be downloaded automatically
  notes: str = ""
  crop_area_min: float = 0.05  # training crops cover this much of the image area or more
  flip: bool = True  # training flips images left-right at random
  folder: str = ""  # root of an image folder dataset


_CARS_NOTE = ("Stanford's download links for Cars196 no longer work: get the four files"
              " from a mirror of the Stanford Cars dataset (names must match).")
_DIGITS = dict(crop_area_min=0.5, flip=False)  # digits are small and not mirror-symmetric

DATASETS: dict[str, DatasetInfo] = {info.name: info for info in [
    DatasetInfo("caltech_birds2011", "train", "test", 200, "caltech_birds2011"),
    DatasetInfo("oxford_flowers102", "train+validation", "test", 102, "oxford_flowers102"),
    DatasetInfo("cifar10", "train", "test", 10, "cifar10"),
    DatasetInfo("cifar100", "train", "test", 100, "cifar100"),
    DatasetInfo("oxford_iiit_pet", "train", "test", 37, "oxford_iiit_pet"),
    DatasetInfo("food101", "train", "validation", 101, "food101"),
    DatasetInfo("cars196", "train", "test", 196, "cars196", manual_only=True, notes=_CARS_NOTE),
    DatasetInfo("digits_demo/pretrain", "train", "test", 5, "digits_demo/pretrain", **_DIGITS),
    DatasetInfo("digits_demo/finetune", "train", "test", 5, "digits_demo/finetune", **_DIGITS),
    DatasetInfo("digits_demo/all", "train", "test", 10, "digits_demo/all", **_DIGITS),
]}
DATASETS["digits_demo"] = dataclasses.replace(DATASETS["digits_demo/finetune"], name="digits_demo")


def dataset_info(name: str, data_dir: Optional[str] = None) -> DatasetInfo:
  """The DatasetInfo of a name in DATASETS or of "folder:PATH" (which lists PATH)."""
  del data_dir  # the table does not depend on it; kept for a uniform signature
  if name.startswith(FOLDER_PREFIX):
    root = name[len(FOLDER_PREFIX):]
    folder = FolderSource(root)
    return DatasetInfo(name, "train", folder.eval_split, len(folder.classes), folder=root)
  if name not in DATASETS:
    raise ValueError(f"Unknown dataset {name!r}: expected one of {', '.join(sorted(DATASETS))},"
                     f" or '{FOLDER_PREFIX}PATH' for images in PATH/train/CLASS/ and PATH/test/CLASS/.")
  return DATASETS[name]


def _local_builder(info: DatasetInfo):
  if info.tfds_name.startswith("digits_demo/"):
    config = info.tfds_name.split("/", 1)[1]
    return lambda data_dir: DigitsDemo(config=config, data_dir=data_dir)
  return None


def prepare(name: str, data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
            download: bool = True, *, multi_host: bool = False) -> str:
  """Makes sure `name` is on disk; returns the folder it is read from.

  Raises DatasetMissingError when it is not there and cannot be prepared now.
  """
  info = dataset_info(name)
  if info.folder:
    return info.folder
  return str(tfds_source.prepare(
      name, info.tfds_name, data_dir=data_dir or tfds_source.default_data_dir(),
      manual_dir=manual_dir, download=download, manual_only=info.manual_only, notes=info.notes,
      local_builder=_local_builder(info), multi_host=multi_host))


def _source(info: DatasetInfo, data_dir, manual_dir, download, multi_host):
  if info.folder:
    return FolderSource(info.folder)
  path = prepare(info.name, data_dir, manual_dir, download, multi_host=multi_host)
  return tfds_source.TfdsSource(info.name, path, image_key=info.image_key,
                                label_key=info.label_key)


def num_classes(name: str, data_dir: Optional[str] = None) -> int:
  return dataset_info(name, data_dir).num_classes


def num_examples(name: str, split: str, data_dir: Optional[str] = None, *,
                 manual_dir: Optional[str] = None, download: bool = True) -> int:
  """Examples in `split` (all hosts together); prepares the dataset if needed."""
  info = dataset_info(name)
  return _source(info, data_dir, manual_dir, download, multi_host=False).num_examples(split)


def _host(process_index: Optional[int], process_count: Optional[int]) -> tuple[int, int]:
  index = jax.process_index() if process_index is None else int(process_index)
  count = jax.process_count() if process_count is None else int(process_count)
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"process_index must be in [0, process_count); got {index} of {count}")
  return index, count


def _local_batch_size(batch_size: int, count: int) -> int:
  if batch_size < 1 or batch_size % count:
    raise ValueError(f"batch_size is the global batch and must be a positive multiple of the"
                     f" number of processes ({count}); got {batch_size}")
  return batch_size // count


def _key(seed: int, index: int, purpose: int) -> int:
  """A 63-bit integer drawn from (seed, host, purpose), different for each of them."""
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  words = np.random.SeedSequence([int(seed), index, purpose]).generate_state(2, np.uint32)
  return (int(words[0]) << 31) ^ int(words[1])


def _deterministic(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


class _SizedBatches:
  """An iterator over numpy batches that also knows how many it yields."""

  def __init__(self, ds: tf.data.Dataset, length: int):
    self._iterator = ds.as_numpy_iterator()
    self._length = length

  def __iter__(self):
    return self

  def __next__(self) -> dict:
    return next(self._iterator)

  def __len__(self) -> int:
    return self._length


def train_batches(name: str, *, batch_size: int, image_size: int, seed: int, start_step: int = 0,
                  data_dir: Optional[str] = None, manual_dir: Optional[str] = None,
                  split: Optional[str] = None, download: bool = True,
                  shuffle_buffer: int = DEFAULT_SHUFFLE_BUFFER,
                  crop_area_min: Optional[float] = None, flip: Optional[bool] = None,
                  process_index: Optional[int] = None,
                  process_count: Optional[int] = None) -> Iterator[dict]:
  """Endless augmented training batches of this host, from step `start_step` on.

  `batch_size` is the global batch; each host gets batch_size // process_count rows.
  The batches are a function of (seed, step, process_index, process_count) alone; see
  the module docstring. `crop_area_min` and `flip` default to the dataset's settings.
  `shuffle_buffer` examples (encoded) are permuted together; two such windows are in
  memory while the next is read ahead. Resuming mid-epoch reads and drops the examples
  before `start_step` in that epoch (up to one epoch of files, no decoding).
  """
  info = dataset_info(name)
  index, count = _host(process_index, process_count)
  local = _local_batch_size(batch_size, count)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  crop_area_min = info.crop_area_min if crop_area_min is None else float(crop_area_min)
  if not 0.0 < crop_area_min <= 1.0:
    raise ValueError(f"crop_area_min must be in (0, 1], got {crop_area_min}")
  flip = info.flip if flip is None else bool(flip)
  shuffle_key = tf.constant(_key(seed, index, 0), tf.int64)
  augment_key = tf.constant(_key(seed, index, 1), tf.int64)

  source = _source(info, data_dir, manual_dir, download, multi_host=count > 1)
  split = split or info.train_split
  examples, size = source.read(split, index, count)
  if size == 0:
    raise ValueError(f"Host {index} of {count} has no examples of {name!r} split {split!r}"
                     f" ({source.num_examples(split)} in all).")

  window = max(1, min(int(shuffle_buffer), size))

  def windows(e):
    return examples.batch(window).enumerate().map(lambda w, batch: (e, w, batch))

  def permute(e, w, batch):
    # Stateless permutations, not tf.data's shuffle: that one mixes TensorFlow's
    # global seed into its own, so the order would not be a function of `seed` alone.
    window_seed = tf.random.experimental.stateless_fold_in(tf.stack([shuffle_key, e]), w)
    order = tf.random.experimental.stateless_shuffle(
        tf.range(tf.shape(batch["label"])[0]), window_seed, alg="philox")
    return tf.nest.map_structure(lambda x: tf.gather(x, order), batch)

  def augment(position, example):
    image = preprocess.train_image(
        example["image"], tf.stack([augment_key, position]), image_size=image_size,
        crop_area_min=crop_area_min, flip=flip)
    return {"image": image, "label": tf.cast(example["label"], tf.int32),
            "mask": tf.constant(1.0, tf.float32)}

  first = start_step * local
  first_epoch, offset = divmod(first, size)
  ds = tf.data.Dataset.range(first_epoch, _FOREVER).flat_map(windows)
  # Reads the next window while this one is used, across epoch ends too.
  ds = ds.map(permute).prefetch(1).unbatch()
  ds = ds.skip(offset).enumerate(start=first)
  ds = ds.map(augment, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.batch(local, drop_remainder=True).prefetch(tf.data.AUTOTUNE)
  return _deterministic(ds).as_numpy_iterator()


def eval_batches(name: str, *, batch_size: int, image_size: int, data_dir: Optional[str] = None,
                 split: Optional[str] = None, manual_dir: Optional[str] = None,
                 download: bool = True, crop_fraction: float = 1.0,
                 process_index: Optional[int] = None,
                 process_count: Optional[int] = None) -> Iterator[dict]:
  """One pass over the eval split in batches of batch_size // process_count rows.

  Every host yields the same number of batches, `len(...)` of the result; rows past
  the end of a host's slice are zero images with label 0 and mask 0.
  `crop_fraction` < 1 resizes the shorter side to image_size / crop_fraction and
  crops the centre; 1 resizes the whole image to the square.
  """
  info = dataset_info(name)
  index, count = _host(process_index, process_count)
  local = _local_batch_size(batch_size, count)
  source = _source(info, data_dir, manual_dir, download, multi_host=count > 1)
  split = split or info.eval_split
  total = source.num_examples(split)
  examples, size = source.read(split, index, count)
  steps = math.ceil(math.ceil(total / count) / local)

  # Plain tensor code: AutoGraph has nothing to convert, and trying warns at every eval.
  @tf.autograph.experimental.do_not_convert
  def resize(example):
    image = preprocess.eval_image(example["image"], image_size=image_size,
                                  crop_fraction=crop_fraction)
    return {"image": image, "label": tf.cast(example["label"], tf.int32),
            "mask": tf.constant(1.0, tf.float32)}

  blank = {"image": tf.zeros([image_size, image_size, 3], tf.float32),
           "label": tf.constant(0, tf.int32), "mask": tf.constant(0.0, tf.float32)}
  ds = examples.map(resize, num_parallel_calls=tf.data.AUTOTUNE)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(steps * local - size))
  ds = ds.batch(local).prefetch(tf.data.AUTOTUNE)
  return _SizedBatches(_deterministic(ds), steps)
