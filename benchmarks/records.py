"""The benchmark's records: one per (model, batch, method, backend), saved as a JSON list.

The keys the issue names come first; the rest say how a figure was obtained.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Iterable, Optional

from benchmarks.cases import Case, Method


@dataclasses.dataclass
class Record:
  model: str  # "Ti/16", "S/16", "B/16", "L/16" or "demo"
  batch: int
  method: str  # "full", "remat", "razor" or "razor_sample"
  prune_ratio: float  # 0.0 for full and remat
  # jax.default_backend() where the figures were taken ("cpu", "gpu", ...), or the GPU a
  # step was compiled for without one, "gpu-aot:h200" (benchmarks/gpu_aot.py)
  backend: str
  compiled_peak_bytes: Optional[int] = None  # argument + output + temp - alias of one step
  measured_peak_bytes: Optional[int] = None  # see measured_peak_kind; None: not measured
  step_time_ratio: Optional[float] = None  # median step time / full's, same run and batch
  bits_per_element: Optional[float] = None  # stored bits per element of packed residuals
  grad_cosine: Optional[dict] = None  # parameter (per layer) -> cosine(method, exact)
  # How the figures were taken.
  dtype: str = "float32"  # compute dtype (params are float32)
  image_size: int = 224
  measured_peak_kind: Optional[str] = None  # "rss" (CPU) or "device_peak_bytes_in_use"
  step_time_s: Optional[float] = None  # median seconds per step
  grad_cosine_min: Optional[float] = None
  grad_cosine_mean: Optional[float] = None
  grad_cosine_data: Optional[str] = None  # what the cosines were computed on
  device: Optional[str] = None
  # Compiled for a GPU (gpu-aot): benchmarks.gpu_time.Estimate.to_json() of the step,
  # the modeled seconds (time_s and its parts), kernel launches and host round trips.
  modeled: Optional[dict] = None
  # What was resolved for the target rather than by this process's backend, e.g.
  # {"granularity": "token", "batch_chunk": 0} for a GPU compiled from a CPU process.
  settings: Optional[dict] = None
  commit: Optional[str] = None  # the razor_jax commit measured ("+modified": uncommitted edits)

  @property
  def label(self) -> str:
    return Method(self.method, self.prune_ratio).label

  @property
  def key(self) -> tuple:
    return (self.model, self.batch, self.label, self.backend, self.dtype, self.image_size)

  @classmethod
  def for_case(cls, case: Case, backend: str, **fields) -> "Record":
    return cls(model=case.model, batch=case.batch, method=case.method.name,
               prune_ratio=case.method.prune_ratio, backend=backend, dtype=case.dtype,
               image_size=case.resolution, **fields)

  def to_json(self) -> dict:
    return dataclasses.asdict(self)


REQUIRED = {"model": str, "batch": int, "method": str, "prune_ratio": float, "backend": str,
            "compiled_peak_bytes": (int, type(None)), "measured_peak_bytes": (int, type(None)),
            "step_time_ratio": (float, type(None)), "bits_per_element": (float, type(None)),
            "grad_cosine": (dict, type(None))}


def check(record: dict) -> dict:
  """Raises ValueError unless `record` has the issue's keys with the right types."""
  for key, types in REQUIRED.items():
    if key not in record:
      raise ValueError(f"record lacks {key!r}: {record}")
    if not isinstance(record[key], types) or isinstance(record[key], bool):
      raise ValueError(f"record's {key!r} is {record[key]!r}; expected {types}")
  return record


def load(path: str) -> list[Record]:
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8") as f:
    rows = json.load(f)
  fields = {f.name for f in dataclasses.fields(Record)}
  return [Record(**{k: v for k, v in check(r).items() if k in fields}) for r in rows]


def write_json(path: str, doc) -> None:
  """Writes `doc` to `path` whole or not at all (an interrupted write leaves the old file)."""
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path + ".tmp", "w", encoding="utf-8") as f:
    json.dump(doc, f, indent=1)
    f.write("\n")
  os.replace(path + ".tmp", path)


def save(path: str, records: Iterable[Record]):
  write_json(path, [check(r.to_json()) for r in sorted(records, key=sort_key)])


def merge(old: Iterable[Record], new: Iterable[Record]) -> list[Record]:
  """`old` updated by `new`: for records of the same key, each field `new` has (not None)
  replaces the old one, so a rerun of some measurements keeps the others."""
  merged = {r.key: r for r in old}
  for r in new:
    if r.key in merged:
      given = {k: v for k, v in dataclasses.asdict(r).items() if v is not None}
      r = dataclasses.replace(merged[r.key], **given)
    merged[r.key] = r
  return list(merged.values())


_MODEL_ORDER = ("demo", "Ti/16", "S/16", "B/16", "L/16")
_METHOD_ORDER = ("full", "remat", "razor", "razor_sample")


def sort_key(r: Record) -> tuple:
  model = _MODEL_ORDER.index(r.model) if r.model in _MODEL_ORDER else len(_MODEL_ORDER)
  method = _METHOD_ORDER.index(r.method) if r.method in _METHOD_ORDER else len(_METHOD_ORDER)
  return (r.backend, model, r.model, r.dtype, r.image_size, r.batch, method, r.prune_ratio)
