"""One knob for Back Razor: what each kind of op prunes and how it stores the rest.

The layers (`razor_jax.layers`), the ViT (`razor_jax.models.vit.ViT`) and
`razorize()` take the same two arguments, resolved here by `resolve`:

  prune_ratio  the fraction of each saved activation that is pruned, in [0, 1);
               0.8 when neither argument is given (the paper's is 0.9; README,
               "The default policy"). 0 is
               plain fine-tuning: every gradient exact, GELU's included.
  policy       a `Policy`, for per-op-type ratios or other storage formats. It
               carries its own ratio, so passing both is an error.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

import jax

from razor_jax import packed
from razor_jax.ops import ESTIMATORS, GELU_FORMATS, PackSpec

# Chosen by transfer accuracy and GPU memory (README, "The default policy"); the paper's is 0.9.
DEFAULT_PRUNE_RATIO = 0.8
# Kinds of op a policy can set apart. "attention" covers QK^T and softmax(.)V; the
# q/k/v/out projections are "dense". "softmax" is the attention probabilities that
# softmax(.)V saves (its V stays "attention"); unset, it follows "attention".
OP_TYPES = ("dense", "attention", "softmax", "layer_norm", "conv")
# Op types that take another's setting where the policy leaves them unset.
_FALLBACK = {"softmax": "attention"}
GELU_STORAGES = ("auto",) + GELU_FORMATS
# What value_format="auto" stores on token rows, per op type (other op types: "sign" at
# AUTO_SIGN_MIN_RATIO and above, "log4" below). The attention probabilities keep
# magnitudes in 3 bits (they are never negative); a convolution's image rows keep 4-bit
# levels (the CNNs were measured with them); the rest keep each value's sign and one mean
# magnitude per row. README, "The default policy".
AUTO_ROW_VALUE_FORMATS = {"softmax": "ulog3", "conv": "log4"}
# One magnitude per row was measured to serve at 10-20% kept; keeping more spans more
# magnitudes than one can stand for, so lower ratios keep log4's levels.
AUTO_SIGN_MIN_RATIO = 0.8
# How a LayerNorm that feeds projections is pruned (see `Policy.layer_norm_mode`).
LAYER_NORM_MODES = ("fused", "separate")


@dataclasses.dataclass(frozen=True)
class Policy:
  """How Back Razor prunes each kind of op. Hashable, so it can be a static argument.

  Attributes:
    prune_ratio: default fraction pruned for every op type (0 = exact fine-tuning).
    granularity: which elements compete for the K kept:
      "token" (default): each token's features (all heads of q/k/v), each query's
        attention row, each image row (W x C) of a CNN's feature map; by bfloat16
        magnitude. One sort per row block on GPU (see `selection.topk_rows`), a 15-pass
        search on CPU. The default on every backend, chosen by measurement (README,
        "Weight gradients that keep their length"): closer to full fine-tuning in most
        transfer cells measured, less XLA:CPU memory than "sample", the same gradients
        on CPU and GPU; its XLA:CPU step costs 1.2-2.3x the sample groups' one
        (small ViTs; README, "Measurements").
      "sample": each batch sample, by exact magnitude (the paper's rule); a
        sampled-bracket search tuned for XLA:CPU, which on GPU costs data-dependent
        loops and conditionals.
      "auto": the name configs used when the default depended on the backend (CPU
        took "sample"); it now means "token" everywhere.
    value_format: storage of kept values: "auto" (token rows: "ulog3" for the attention
      probabilities, "log4" for convolutions, "sign" for the rest at ratios of 0.8 and
      above, "log4" below, see `AUTO_ROW_VALUE_FORMATS` and `AUTO_SIGN_MIN_RATIO`;
      sample groups: bfloat16 in 15 bits, float16 for float16 inputs), "log4" (rows
      only: 4-bit log levels with the sign; the default before the 0.8 policy),
      "sign" (rows only: 1 bit, the sign, with one mean magnitude per row), "int8",
      "bfloat16", "float16", "float32"; "ulog3" (rows only: log4 without the sign bit)
      only in `value_formats`, for "softmax".
    position_format: "auto" (rows: "elias_fano"; groups: bitmask or indices,
      whichever is smaller), "elias_fano", "indices", "bitmask" (groups only).
    gelu_storage: what GELU keeps for its backward: "auto" (exact when the policy
      prunes nothing, else "uint2"), "uint8" / "uint4" / "uint2" (its derivative in
      that many bits), "bfloat16" / "float16" (its input in that dtype; "float16" is the
      original code's) or None (exact).
    ratios: per-op-type prune ratios overriding `prune_ratio`, as ((op_type, ratio), ...);
      build it with `Policy.make(..., attention=0.0)`. "softmax" (the attention
      probabilities) takes "attention"'s ratio unless set itself.
    keep_rule: "exact_k" (K = round((1 - ratio) n) kept, ties broken by position) or
      "threshold" (the original code's: every |a| >= the floor(n ratio)-th smallest,
      ties kept; granularity "sample"). See `packed.keep_count`.
    layer_norm_mode: a LayerNorm that feeds projections (LN -> q/k/v, LN -> fc1):
      "fused" packs its normalized input x_hat once for both backwards (projections see
      bias where x_hat was pruned; `block_ops`); "separate" packs its input x (its
      backward at the pruned x, exact mean and 1/std) and, again, its output for the
      projections, as the original code does: two copies, more memory. On the demo
      ViT at 0.9 the two have the same fidelity to exact gradients (mean cosine per
      parameter 0.660 fused vs 0.663 separate, backbone norm ratio 0.272 vs 0.273),
      while the separate copies raise the compiled train step from 17.7 to 28.3 MiB
      (with the rest of `Policy.paper`); README, "The original code's semantics".
    value_formats: per-op-type value formats overriding `value_format`, as
      ((op_type, format), ...) (the paper preset keeps LayerNorm inputs in float32);
      "softmax" takes "attention"'s unless set itself.
    estimator: "none" (weight gradients from the pruned copy, the paper's rule) or
      "energy" (that copy scaled per group by |a|^2 / |a_kept|^2 for weight gradients
      only; one float32 per group more). See `ops.PackSpec`.
  """
  prune_ratio: float = DEFAULT_PRUNE_RATIO
  granularity: str = "token"
  value_format: str = "auto"
  position_format: str = "auto"
  gelu_storage: Optional[str] = "auto"
  ratios: tuple = ()
  keep_rule: str = "exact_k"
  layer_norm_mode: str = "fused"
  value_formats: tuple = ()
  estimator: str = "none"

  def __post_init__(self):
    packed.check_prune_ratio(self.prune_ratio)
    if self.granularity == "auto":  # configs written before "token" was everyone's default
      object.__setattr__(self, "granularity", "token")
    packed.check_granularity(self.granularity)
    if self.gelu_storage is not None and self.gelu_storage not in GELU_STORAGES:
      raise ValueError(
          f"gelu_storage must be one of {GELU_STORAGES} or None (exact), got {self.gelu_storage!r}")
    for op_type, ratio in self.ratios:
      if op_type not in OP_TYPES:
        raise ValueError(f"unknown op type {op_type!r} in a policy; expected one of {OP_TYPES}")
      packed.check_prune_ratio(ratio, f"prune ratio for {op_type!r}")
    if self.layer_norm_mode not in LAYER_NORM_MODES:
      raise ValueError(f"layer_norm_mode must be one of {LAYER_NORM_MODES},"
                       f" got {self.layer_norm_mode!r}")
    if self.estimator not in ESTIMATORS:
      raise ValueError(f"estimator must be one of {ESTIMATORS}, got {self.estimator!r}")
    packed.check_keep_rule(self.keep_rule)
    if self.keep_rule == "threshold" and self.granularity != "sample":
      raise ValueError("keep_rule='threshold' (the original code's rule) prunes per sample;"
                       f" got granularity={self.granularity!r}: use granularity='sample'")
    for op_type, _ in self.value_formats:
      if op_type not in OP_TYPES:
        raise ValueError(f"unknown op type {op_type!r} in value_formats; expected one of"
                         f" {OP_TYPES}")
    # Formats that drop the sign fit only rows that are never negative: probabilities.
    unsigned = [(op, f) for op, f in (("every op type (value_format)", self.value_format),
                                      *self.value_formats)
                if f in packed.UNSIGNED_VALUE_FORMATS and op != "softmax"]
    if unsigned:
      op, value_format = unsigned[0]
      raise ValueError(f"value_format {value_format!r} drops the sign, so it fits only the"
                       f" attention probabilities (op type 'softmax'), got it for {op}: use"
                       f" value_formats=(('softmax', {value_format!r}),)")
    # Validates value_format and position_format once, here.
    for value_format in {self.value_format, *dict(self.value_formats).values()}:
      PackSpec(self.prune_ratio, self.granularity, value_format, self.position_format)

  @classmethod
  def make(cls, prune_ratio: float = DEFAULT_PRUNE_RATIO, *,
           ratios: Optional[Mapping[str, float]] = None, **kwargs) -> "Policy":
    """Policy.make(0.9, attention=0.0) keeps attention exact and prunes the rest at 0.9."""
    per_op = dict(ratios or {})
    for op_type in OP_TYPES:
      if op_type in kwargs:
        per_op[op_type] = kwargs.pop(op_type)
    return cls(prune_ratio=prune_ratio, ratios=tuple(sorted(per_op.items())), **kwargs)

  @classmethod
  def paper(cls, prune_ratio: float = DEFAULT_PRUNE_RATIO, **kwargs) -> "Policy":
    """The original PyTorch code's semantics (ViT path, quantization off), op by op.

    Per sample over the whole tensor, keep |a| >= the floor(n ratio)-th smallest |a|
    (ties kept); kept values in float16 with a 1-bit mask, LayerNorm inputs in
    float32; a LayerNorm's input and its output pruned separately; GELU keeps its
    input in float16 (exact at ratio 0). `kwargs` override fields (e.g. estimator).
    """
    fields = dict(granularity="sample", value_format="float16", position_format="bitmask",
                  gelu_storage="float16" if prune_ratio else None, keep_rule="threshold",
                  layer_norm_mode="separate", value_formats=(("layer_norm", "float32"),))
    fields.update(kwargs)
    return cls(prune_ratio=prune_ratio, **fields)

  def _setting(self, per_op: tuple, op_type: str, default):
    if op_type not in OP_TYPES:
      raise ValueError(f"unknown op type {op_type!r}; expected one of {OP_TYPES}")
    per_op = dict(per_op)
    while op_type not in per_op and op_type in _FALLBACK:
      op_type = _FALLBACK[op_type]
    return per_op.get(op_type, default)

  def ratio(self, op_type: str) -> float:
    return self._setting(self.ratios, op_type, self.prune_ratio)

  def spec(self, op_type: str) -> Optional[PackSpec]:
    """The PackSpec for `op_type`, or None where that op runs exactly."""
    ratio = self.ratio(op_type)
    if ratio == 0.0:
      return None
    value_format = self._setting(self.value_formats, op_type, self.value_format)
    if value_format == "auto" and self.granularity == "token":
      value_format = AUTO_ROW_VALUE_FORMATS.get(
          op_type, "sign" if ratio >= AUTO_SIGN_MIN_RATIO else "log4")
    return PackSpec(ratio, self.granularity, value_format, self.position_format, self.keep_rule,
                    self.estimator)

  @property
  def prunes(self) -> bool:
    """Whether any op type is pruned."""
    return any(self.ratio(t) != 0.0 for t in OP_TYPES)

  @property
  def gelu(self) -> Optional[str]:
    """GELU's storage in force ("auto" resolved); None means an exact GELU."""
    if self.gelu_storage == "auto":
      return "uint2" if self.prunes else None
    return self.gelu_storage

  @property
  def exact(self) -> bool:
    """Whether everything is exact: plain fine-tuning."""
    return not self.prunes and self.gelu is None


def auto_batch_chunk(platform: Optional[str] = None) -> int:
  """The ViT's default batch slice for `platform` (default: jax's backend); 0 = none.

  XLA:CPU keeps one block's dense temporaries per slice of 32 samples; on GPU each
  slice repeats every kernel launch of the block, and the full batch's temporaries
  are smaller than the launches cost (see README, "Measurements").
  """
  return 32 if (platform or jax.default_backend()) == "cpu" else 0


def resolve(prune_ratio: Optional[float] = None, policy: Optional[Policy] = None) -> Policy:
  """The Policy in force for a `prune_ratio` or a `policy` (at most one of them given).

  Raises:
    ValueError: for both given, a policy that is not a Policy, or a ratio outside [0, 1).
  """
  if policy is not None:
    if not isinstance(policy, Policy):
      raise ValueError(f"policy must be a razor_jax.Policy or None, got {type(policy).__name__}")
    if prune_ratio is not None:
      raise ValueError(
          f"got both prune_ratio={prune_ratio!r} and policy={policy!r}; pass one: a Policy"
          " carries its own prune_ratio (e.g. policy=Policy.make(0.9, attention=0.0))")
    return policy
  if prune_ratio is None:
    return Policy(DEFAULT_PRUNE_RATIO)
  return Policy(packed.check_prune_ratio(prune_ratio))
