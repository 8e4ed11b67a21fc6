"""One object that says how much each kind of op prunes; shared by layers and razorize()."""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

from razor_jax import packed
from razor_jax.ops import GELU_FORMATS, PackSpec

# Kinds of op a policy can set apart. "attention" covers QK^T and softmax(.)V; the
# q/k/v/out projections are "dense".
OP_TYPES = ("dense", "attention", "layer_norm", "conv")


@dataclasses.dataclass(frozen=True)
class Policy:
  """How Back Razor prunes each kind of op. Hashable, so it can be a static argument.

  Attributes:
    prune_ratio: default fraction pruned for every op type (0 = exact fine-tuning).
    granularity: "sample" (top-K per batch sample, the paper's rule) or "token".
    value_format: storage of kept values ("auto" = bf16 for float32 inputs; "int8").
    position_format: "auto", "bitmask" or "indices".
    gelu_storage: "uint8" (8-bit derivative), "bfloat16" (bf16 input) or None (exact).
    ratios: per-op-type prune ratios overriding `prune_ratio`, as ((op_type, ratio), ...);
      build it with `Policy.make(..., attention=0.0)`.
  """
  prune_ratio: float = 0.9
  granularity: str = "sample"
  value_format: str = "auto"
  position_format: str = "auto"
  gelu_storage: Optional[str] = "uint8"
  ratios: tuple = ()

  def __post_init__(self):
    packed.check_prune_ratio(self.prune_ratio)
    packed.check_granularity(self.granularity)
    if self.gelu_storage is not None and self.gelu_storage not in GELU_FORMATS:
      raise ValueError(
          f"gelu_storage must be one of {GELU_FORMATS} or None, got {self.gelu_storage!r}")
    for op_type, ratio in self.ratios:
      if op_type not in OP_TYPES:
        raise ValueError(f"unknown op type {op_type!r} in a policy; expected one of {OP_TYPES}")
      packed.check_prune_ratio(ratio, f"prune ratio for {op_type!r}")
    # Validates value_format and position_format once, here.
    PackSpec(self.prune_ratio, self.granularity, self.value_format, self.position_format)

  @classmethod
  def make(cls, prune_ratio: float = 0.9, *, ratios: Optional[Mapping[str, float]] = None,
           **kwargs) -> "Policy":
    """Policy.make(0.9, attention=0.0) keeps attention exact and prunes the rest at 0.9."""
    per_op = dict(ratios or {})
    for op_type in OP_TYPES:
      if op_type in kwargs:
        per_op[op_type] = kwargs.pop(op_type)
    return cls(prune_ratio=prune_ratio, ratios=tuple(sorted(per_op.items())), **kwargs)

  def ratio(self, op_type: str) -> float:
    if op_type not in OP_TYPES:
      raise ValueError(f"unknown op type {op_type!r}; expected one of {OP_TYPES}")
    return dict(self.ratios).get(op_type, self.prune_ratio)

  def spec(self, op_type: str) -> Optional[PackSpec]:
    """The PackSpec for `op_type`, or None where that op runs exactly."""
    ratio = self.ratio(op_type)
    if ratio == 0.0:
      return None
    return PackSpec(ratio, self.granularity, self.value_format, self.position_format)

  @property
  def exact(self) -> bool:
    return all(self.ratio(t) == 0.0 for t in OP_TYPES) and self.gelu_storage is None


def as_policy(prune_ratio_or_policy) -> Policy:
  """A Policy from a Policy or a bare prune ratio (0 means exact everywhere, gelu included)."""
  if isinstance(prune_ratio_or_policy, Policy):
    return prune_ratio_or_policy
  ratio = packed.check_prune_ratio(prune_ratio_or_policy)
  return Policy(prune_ratio=ratio, gelu_storage=None if ratio == 0.0 else "uint8")
