"""Which of attention's pruned copies lose the gradient: q, k, the probabilities or v.

A policy sets one ratio for all four copies that attention saves (q and k for QK^T, the
probabilities P and v for softmax(.)V). This measures them one at a time: on the demo
ViT and real digit batches (benchmarks.fidelity's comparison), the default policy with
one or more copies pruned at another ratio, against exact gradients.

  python -m benchmarks.attention_ablation [--batches 2]

prints a markdown table (backbone cosine and norm ratio, mean cosine per parameter).
The per-copy ratios are set by re-registering the two attention ops' forward rules for
the duration of a measurement (`copy_ratios`); the library has no such option.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import sys
from typing import Optional, Sequence

import jax.numpy as jnp

from razor_jax import barriers, ops

# label -> prune ratios of (q, k, P, v), and whether q, k and v compete for K per head
# (a row per token and head) instead of per token (all heads in one row, the library's).
CASES = {
    "default (all four at 0.9)": (0.9, 0.9, 0.9, 0.9),
    "q and k at 0.5": (0.5, 0.5, 0.9, 0.9),
    "P at 0.5": (0.9, 0.9, 0.5, 0.9),
    "v at 0.5": (0.9, 0.9, 0.9, 0.5),
    "P exact": (0.9, 0.9, 0.0, 0.9),
    "v exact": (0.9, 0.9, 0.9, 0.0),
    "all four at 0.5 (attention=0.5)": (0.5, 0.5, 0.5, 0.5),
    "q, k, v rows per head": (0.9, 0.9, 0.9, 0.9, True),
}


@contextlib.contextmanager
def copy_ratios(q: float, k: float, p: float, v: float, head_rows: bool = False):
  """Within the block, attention packs q, k, P and v at these ratios (the policy's
  other fields as they are), and with `head_rows` q, k and v by rows per token and head;
  the library's forward rules are restored after."""
  row_ndim = 1 if head_rows else 2  # q, k, v are (..., tokens, heads, features)

  def qk_fwd(q_, k_, spec, precision):
    res = (dataclasses.replace(spec, prune_ratio=q).pack(q_, row_ndim),
           dataclasses.replace(spec, prune_ratio=k).pack(k_, row_ndim))
    return barriers.depend(ops._qk_plain(q_, k_, precision), res), res  # pylint: disable=protected-access

  def pv_fwd(logits, v_, spec, p_spec, precision, softmax_in_float32):
    probs = ops._softmax(logits, v_.dtype, softmax_in_float32)  # pylint: disable=protected-access
    res = (dataclasses.replace(p_spec or spec, prune_ratio=p).pack(probs),
           dataclasses.replace(spec, prune_ratio=v).pack(v_, row_ndim),
           jnp.zeros((0,), logits.dtype))
    return barriers.depend(ops._pv_plain(probs, v_, precision), res[:2]), res  # pylint: disable=protected-access

  # pylint: disable=protected-access
  ops._qk.defvjp(qk_fwd, ops._qk_bwd)
  ops._softmax_pv.defvjp(pv_fwd, ops._softmax_pv_bwd)
  try:
    yield
  finally:
    ops._qk.defvjp(ops._qk_fwd, ops._qk_bwd)
    ops._softmax_pv.defvjp(ops._softmax_pv_fwd, ops._softmax_pv_bwd)


def measure(batches: int = 2, say=print) -> dict:
  """label -> benchmarks.fidelity.compare's figures averaged over `batches` batches."""
  from benchmarks import fidelity  # pylint: disable=g-import-not-at-top
  from razor_jax import Policy  # pylint: disable=g-import-not-at-top
  inputs = fidelity.fidelity_inputs(batches)  # exact gradients once, for every case
  out = {}
  for label, ratios in CASES.items():
    with copy_ratios(*ratios):
      out[label] = fidelity.compare_policy(Policy(0.9, value_format="log4"), *inputs)
    say(f"{label}: {out[label]}")
  return out


def markdown(results: dict) -> list[str]:
  lines = ["| attention's copies (q, k, P, v): 0.9 unless said | backbone cosine | backbone norm ratio |"
           " mean cosine per parameter |", "|---|---|---|---|"]
  for label, r in results.items():
    lines.append(f"| {label} | {r['backbone_cosine']:.3f} | {r['backbone_norm_ratio']:.3f} |"
                 f" {r['mean_cosine']:.3f} |")
  return lines


def main(argv: Optional[Sequence[str]] = None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=2)
  args = parser.parse_args(argv)
  print("\n".join(markdown(measure(args.batches))))
  return 0


if __name__ == "__main__":
  sys.exit(main())
