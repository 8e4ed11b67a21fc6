"""Local image folders as a data source: ROOT/SPLIT/CLASS/IMAGE.

    ROOT/train/cardinal/0001.jpg
    ROOT/train/wren/0002.png
    ROOT/test/cardinal/0100.jpg  (the eval split is `test`, else `validation`, else `val`)

Class names are the sorted union of the class folders of all splits, labelled 0..K-1
in that order, so every split agrees on labels. Images are JPEG, PNG, GIF or BMP.
Within a split, files are put in an order fixed by a hash of CLASS/NAME: it does not
depend on the machine, and it mixes classes, so a shuffle buffer and a per-host slice
see all of them.
"""
from __future__ import annotations

import hashlib

import tensorflow as tf
from etils import epath

from razor_jax.data.errors import DatasetMissingError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")
EVAL_SPLIT_NAMES = ("test", "validation", "val")
LAYOUT = ("ROOT/train/CLASS/IMAGE and ROOT/test/CLASS/IMAGE (or validation/ or val/ for"
          f" the eval split; images {', '.join(IMAGE_SUFFIXES)})")


def host_range(num: int, index: int, count: int) -> tuple[int, int]:
  """[start, stop) of host `index` of `count` over `num` items, the first hosts taking
  one extra when `num` does not divide (the rule of `tfds.even_splits`)."""
  base, extra = divmod(num, count)
  start = index * base + min(index, extra)
  return start, start + base + (1 if index < extra else 0)


def _order_key(relative: str) -> str:
  return hashlib.sha1(relative.encode("utf-8")).hexdigest()


class FolderSource:
  """Class-per-subfolder images under `root`, split by the first folder level."""

  def __init__(self, root: str):
    self.root = epath.Path(root).expanduser()
    if not self.root.is_dir():
      raise DatasetMissingError(
          f"Image folder {str(self.root)!r} does not exist. Expected the layout {LAYOUT}.")
    self._splits = sorted(p.name for p in self.root.iterdir()
                          if p.is_dir() and any(c.is_dir() for c in p.iterdir()))
    if "train" not in self._splits:
      raise DatasetMissingError(
          f"Image folder {str(self.root)!r} has no train/ folder of class folders"
          f" (found {self._splits or 'none'}). Expected the layout {LAYOUT}.")
    self.classes = sorted({c.name for s in self._splits
                           for c in (self.root / s).iterdir() if c.is_dir()})
    self._files: dict[str, tuple[list[str], list[int]]] = {}

  @property
  def eval_split(self) -> str:
    for name in EVAL_SPLIT_NAMES:
      if name in self._splits:
        return name
    raise DatasetMissingError(
        f"Image folder {str(self.root)!r} has no eval split: expected one of"
        f" {EVAL_SPLIT_NAMES} beside train/ (found {self._splits}). Layout: {LAYOUT}.")

  def _list(self, split: str) -> tuple[list[str], list[int]]:
    if split not in self._splits:
      raise ValueError(f"Image folder {str(self.root)!r} has no split {split!r};"
                       f" its splits are {self._splits}")
    if split not in self._files:
      entries = []
      for label, name in enumerate(self.classes):
        folder = self.root / split / name
        if not folder.is_dir():
          continue
        for path in folder.iterdir():
          if path.suffix.lower() in IMAGE_SUFFIXES:
            entries.append((_order_key(f"{name}/{path.name}"), str(path), label))
      entries.sort()
      self._files[split] = ([e[1] for e in entries], [e[2] for e in entries])
    return self._files[split]

  def num_examples(self, split: str) -> int:
    return len(self._list(split)[0])

  def read(self, split: str, index: int, count: int) -> tuple[tf.data.Dataset, int]:
    """Host `index`'s slice as {"image": encoded bytes, "label": int64}, in a fixed order."""
    paths, labels = self._list(split)
    start, stop = host_range(len(paths), index, count)
    ds = tf.data.Dataset.from_tensor_slices(
        (tf.constant(paths[start:stop], tf.string), tf.constant(labels[start:stop], tf.int64)))
    ds = ds.map(lambda path, label: {"image": tf.io.read_file(path), "label": label},
                num_parallel_calls=tf.data.AUTOTUNE)
    return ds, stop - start
