"""What one benchmark measurement is: a model, a batch size and a training method.

A `Case` turns into the same config that `razor_jax.train.run` would get, so the step it
measures is the step a fine-tuning run compiles (same optimizer, clipping, donation).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

from razor_jax.models.vit import VARIANTS
from razor_jax.policy import DEFAULT_PRUNE_RATIO
from razor_jax.train import config as train_config

# The four ViTs of the issue, at 224 px; "demo" is the offline demo's tiny ViT at 32 px
# (experiments/configs/demo.py), the only one with a pretrained checkpoint offline.
MODELS = ("Ti/16", "S/16", "B/16", "L/16")
DEMO = "demo"
_DEMO_SIZES = dict(patch_size=4, hidden_size=64, mlp_dim=128, num_heads=4, num_layers=4)
# The paper measured memory on CIFAR-100: 100 classes for the 224 px models.
NUM_CLASSES = {DEMO: 5}
DEFAULT_CLASSES = 100


@dataclasses.dataclass(frozen=True)
class Method:
  """How the backward gets its activations: stored dense, recomputed, or pruned."""
  name: str  # "full", "remat", "razor" or "razor_sample"
  prune_ratio: float = 0.0

  @property
  def label(self) -> str:
    """"razor@0.9", "razor_sample@0.9", "full", "remat": the name in tables and flags."""
    return f"{self.name}@{self.prune_ratio:g}" if self.name.startswith("razor") else self.name

  @property
  def exact(self) -> bool:
    return self.name in ("full", "remat")


def parse_method(label: str) -> Method:
  """Method from its label: "full", "remat", "razor@0.9", "razor_sample@0.9"."""
  name, _, ratio = label.partition("@")
  if name in ("full", "remat") and not ratio:
    return Method(name)
  if name in ("razor", "razor_sample") and ratio:
    value = float(ratio)
    if not 0.0 < value < 1.0:
      raise ValueError(f"{label!r}: the prune ratio must be in (0, 1)")
    return Method(name, value)
  raise ValueError(f"unknown method {label!r}; expected full, remat, razor@R or razor_sample@R")


FULL, REMAT = Method("full"), Method("remat")
# The default's ratio and the paper's. "razor@R" is the default policy's formats at R
# (`Policy(R)`); "razor_sample" prunes per sample, the paper's grouping (bfloat16 values
# in 15 bits, bitmask positions), the CPU default until token rows measured better.
RAZOR_RATIOS = (0.8, 0.9)
RAZOR_DEFAULT = Method("razor", DEFAULT_PRUNE_RATIO)  # `Policy()`: what the findings quote
ALL_METHODS = (FULL, REMAT, *(Method("razor", r) for r in RAZOR_RATIOS),
               Method("razor_sample", 0.9))


@dataclasses.dataclass(frozen=True)
class Case:
  """One configuration to measure."""
  model: str  # a ViT variant (MODELS are the ones the plans measure) or DEMO
  batch: int
  method: Method
  dtype: str = "float32"  # compute dtype; params stay float32
  image_size: Optional[int] = None  # None: 224, or 32 for the demo

  @property
  def resolution(self) -> int:
    return self.image_size or (32 if self.model == DEMO else 224)

  @property
  def num_classes(self) -> int:
    return NUM_CLASSES.get(self.model, DEFAULT_CLASSES)

  def replace(self, **changes) -> "Case":
    return dataclasses.replace(self, **changes)

  def to_json(self) -> dict:
    return {"model": self.model, "batch": self.batch, "method": self.method.label,
            "dtype": self.dtype, "image_size": self.image_size}

  @classmethod
  def from_json(cls, d: dict) -> "Case":
    return cls(d["model"], int(d["batch"]), parse_method(d["method"]), d.get("dtype", "float32"),
               d.get("image_size"))

  def config(self):
    """The complete, locked train config of this case (one SGD-momentum step)."""
    model = dict(_DEMO_SIZES, variant="") if self.model == DEMO else dict(variant=self.model)
    model["remat"] = self.method.name == "remat"
    overrides = dict(
        model=model, batch_size=self.batch, image_size=self.resolution, dtype=self.dtype,
        prune_ratio=self.method.prune_ratio, init_path="", dataset="benchmark",
        policy=dict(granularity="sample" if self.method.name == "razor_sample" else "token"),
        memory_report=False, progress_bar=False)
    if self.model != DEMO and self.model not in VARIANTS:
      raise ValueError(f"unknown benchmark model {self.model!r}; expected one of"
                       f" {tuple(VARIANTS) + (DEMO,)}")
    return train_config.complete(overrides)
