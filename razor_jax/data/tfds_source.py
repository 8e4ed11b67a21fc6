"""TFDS datasets read from disk, prepared on first use only where that can succeed.

Offline, `tfds.load` spends minutes retrying downloads before it fails. Here the
prepared files are looked for first (DATA_DIR/NAME/VERSION/dataset_info.json); a
dataset that is not there is prepared only from a local builder, from a `manual_dir`
that holds every source file, or from the network after a connect test to the hosts
of its URLs that takes at most a few seconds. Anything else is a DatasetMissingError
that says how to prepare the dataset.
"""
from __future__ import annotations

import logging
import os
import socket
import threading
import urllib.parse
import urllib.request
from typing import Callable, Optional

import tensorflow as tf
import tensorflow_datasets as tfds
from etils import epath

from razor_jax.data.errors import DatasetMissingError

PROBE_TIMEOUT_S = 3.0


class _DropTfdsDtypeWarning(logging.Filter):
  """tfds's own PartialDecoding reads the deprecated `FeatureConnector.dtype` and
  logs a deprecation warning that no user of it can act on."""

  def filter(self, record: logging.LogRecord) -> bool:
    return ".dtype` is deprecated" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropTfdsDtypeWarning())


def default_data_dir() -> str:
  """TFDS's own default: $TFDS_DATA_DIR, else ~/tensorflow_datasets."""
  return os.environ.get("TFDS_DATA_DIR") or os.path.join(os.path.expanduser("~"), "tensorflow_datasets")


def find_prepared(data_dir: str, tfds_name: str) -> Optional[epath.Path]:
  """The newest fully prepared version folder of `tfds_name` ("name" or "name/config")."""
  root = epath.Path(data_dir).expanduser() / tfds_name
  versions = []
  if root.is_dir():
    for child in root.iterdir():
      parts = child.name.split(".")
      # Preparation writes into "incomplete.*" and renames at the end, so a version
      # folder with dataset_info.json is complete.
      if len(parts) == 3 and all(p.isdigit() for p in parts) and (child / "dataset_info.json").exists():
        versions.append((tuple(int(p) for p in parts), child))
  return max(versions)[1] if versions else None


def source_files(tfds_name: str) -> dict[str, str]:
  """{url: file name} of what the TFDS builder downloads (from its checksums file)."""
  try:
    infos = tfds.builder_cls(tfds_name.split("/")[0]).url_infos or {}
  except Exception:  # an unknown or unusual builder: no list to offer
    return {}
  return {url: info.filename or os.path.basename(urllib.parse.urlparse(url).path)
          for url, info in sorted(infos.items())}


def _connects(host: str, port: int, timeout: float) -> bool:
  # A thread bounds the DNS lookup too, which socket timeouts do not cover.
  result = []

  def attempt():
    try:
      socket.create_connection((host, port), timeout=timeout).close()
      result.append(True)
    except OSError:
      result.append(False)

  thread = threading.Thread(target=attempt, daemon=True)
  thread.start()
  thread.join(timeout + 1.0)
  return bool(result and result[0])


def unreachable_host(urls, timeout: float = PROBE_TIMEOUT_S) -> Optional[str]:
  """The first "host:port" among `urls` (or their proxy) that does not accept a TCP
  connection within `timeout` seconds; None when all do."""
  proxies = urllib.request.getproxies()
  seen = set()
  for url in urls:
    parsed = urllib.parse.urlparse(url)
    if parsed.scheme in proxies:
      parsed = urllib.parse.urlparse(proxies[parsed.scheme])
    host = parsed.hostname
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    if not host or (host, port) in seen:
      continue
    seen.add((host, port))
    if not _connects(host, port, timeout):
      return f"{host}:{port}"
  return None


def _missing_message(name: str, tfds_name: str, data_dir: str, reason: str,
                     files: dict[str, str], manual_only: bool, notes: str) -> str:
  lines = [f"Dataset {name!r} is not prepared in data_dir {data_dir!r} (no"
           f" {tfds_name}/<version>/dataset_info.json there) and was not prepared now: {reason}",
           "To prepare it:"]
  if not manual_only:
    lines.append(f"  - on a machine with network access run: tfds build {tfds_name} --data_dir {data_dir}"
                 f"  (or python -m razor_jax.data {name} --data_dir {data_dir}); copy the"
                 f" {tfds_name}/ folder it writes into this data_dir if that machine is another one;")
  if files:
    lines.append(f"  - {'or ' if not manual_only else ''}download these files by hand into one"
                 f" folder M, then run: python -m razor_jax.data {name} --manual_dir M"
                 f" --data_dir {data_dir}  (or fine-tune with --config.manual_dir=M, which"
                 " prepares it on first use; from Python, manual_dir=M):")
    lines += [f"      {filename}  ({url})" for url, filename in files.items()]
  if notes:
    lines.append(f"  Note: {notes}")
  lines.append("  - or, if it is prepared somewhere else, pass data_dir= or set TFDS_DATA_DIR.")
  return "\n".join(lines)


def prepare(name: str, tfds_name: str, *, data_dir: str, manual_dir: Optional[str] = None,
            download: bool = True, manual_only: bool = False, notes: str = "",
            local_builder: Optional[Callable[[str], tfds.core.DatasetBuilder]] = None,
            multi_host: bool = False) -> epath.Path:
  """The prepared version folder of `tfds_name` in `data_dir`, preparing it if it can.

  `local_builder(data_dir)` makes a builder that needs no network (always built).
  Raises DatasetMissingError, before any download is attempted, when preparing
  cannot work: `download` is False, a multi-host run, a dataset that needs manual
  files and `manual_dir` lacks some, or the source hosts are unreachable.
  """
  found = find_prepared(data_dir, tfds_name)
  if found is not None:
    return found
  if local_builder is not None:
    builder, config = local_builder(data_dir), tfds.download.DownloadConfig(try_download_gcs=False)
  else:
    files = source_files(tfds_name)
    missing = lambda reason: DatasetMissingError(
        _missing_message(name, tfds_name, data_dir, reason, files, manual_only, notes))
    if manual_dir is not None:
      absent = [f for f in files.values() if not (epath.Path(manual_dir).expanduser() / f).exists()]
      if absent:
        raise missing(f"manual_dir {manual_dir!r} lacks {', '.join(absent)}.")
      config = tfds.download.DownloadConfig(manual_dir=manual_dir, try_download_gcs=False)
    elif manual_only:
      raise missing("its source files must be downloaded by hand (pass manual_dir).")
    elif not download:
      raise missing("download=False.")
    elif multi_host:
      raise missing("a multi-host run does not download (every host would write the same"
                    " files); prepare it once before starting.")
    else:
      host = unreachable_host(files)
      if host is not None:
        raise missing(f"no network: {host} did not accept a connection within"
                      f" {PROBE_TIMEOUT_S:g} s (tfds itself would retry for minutes before failing).")
      config = tfds.download.DownloadConfig()
    builder = tfds.builder(tfds_name, data_dir=data_dir)
  logging.info("Preparing %s in %s", tfds_name, data_dir)
  try:
    builder.download_and_prepare(download_config=config)
  except Exception:
    # Another process may have prepared the same dataset at the same time.
    if find_prepared(data_dir, tfds_name) is None:
      raise
  found = find_prepared(data_dir, tfds_name)
  if found is None:
    raise DatasetMissingError(f"Preparing {tfds_name} in {data_dir!r} finished but left no"
                              " dataset_info.json; delete that folder and try again.")
  return found


class TfdsSource:
  """A prepared TFDS dataset, read as encoded images and integer labels."""

  def __init__(self, name: str, version_dir: epath.Path, *, image_key: str, label_key: str):
    self.name = name
    self.builder = tfds.builder_from_directory(version_dir)
    self.image_key, self.label_key = image_key, label_key

  def splits(self) -> list[str]:
    return sorted(self.builder.info.splits.keys())

  def num_examples(self, split: str) -> int:
    try:
      return self.builder.info.splits[split].num_examples
    except (KeyError, ValueError, TypeError) as error:
      raise ValueError(
          f"Dataset {self.name!r} has no split {split!r} ({error}); its splits are"
          f" {self.splits()} (sub-splits such as 'train[:90%]' and sums such as"
          " 'train+validation' work too).") from None

  def read(self, split: str, index: int, count: int) -> tuple[tf.data.Dataset, int]:
    """Host `index`'s even slice as {"image": encoded bytes, "label": int64}, in file order."""
    self.num_examples(split)  # a clear error for a bad split name
    sub = split if count == 1 else tfds.even_splits(split, n=count)[index]
    # Only the two features, the image still encoded: shuffle buffers then hold bytes,
    # and detection boxes or masks of some datasets are never decoded.
    decoders = tfds.decode.PartialDecoding(
        {self.image_key: True, self.label_key: True},
        decoders={self.image_key: tfds.decode.SkipDecoding()})
    # No autocache: reading is deterministic either way, and a cache left half read
    # at the end of training logs a warning.
    ds = self.builder.as_dataset(split=sub, shuffle_files=False, decoders=decoders,
                                 read_config=tfds.ReadConfig(try_autocache=False))
    image_key, label_key = self.image_key, self.label_key
    ds = ds.map(lambda ex: {"image": ex[image_key], "label": tf.cast(ex[label_key], tf.int64)})
    return ds, self.builder.info.splits[sub].num_examples
