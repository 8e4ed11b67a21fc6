"""Compares ways of selecting the top-K magnitudes of an activation (time and temp memory).

  python experiments/bench_selection.py [--shape 32,197,768] [--prune_ratio 0.9]

Each method returns the kept-element mask (or what it needs to build one); printed: the
median ms over jitted calls and XLA's compiled temp bytes. razor_jax uses the bit-pattern
threshold search (`compress.topk_mask`) because it was fastest here with the smallest
transient, and it gives the exact K per group that a static-shape residual needs.
"""
import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from razor_jax import compress, memory


def _methods(k_sample, k_token, width):
  def per_sample_top_k(x):  # sort-based, over the whole sample
    return lax.top_k(jnp.abs(x), k_sample)[1]

  def per_token_top_k(x):  # sort-based, one short row at a time
    return lax.top_k(jnp.abs(x).reshape(-1, width), k_token)[1]

  def approx_max_k(x):  # TPU-approximate; exact sort elsewhere
    return lax.approx_max_k(jnp.abs(x), k_sample)[1]

  def threshold_bits(x):  # razor_jax: exact bit-pattern threshold search
    return compress.topk_mask(x, k_sample)

  def threshold_bits_token(x):
    return compress.topk_mask(x.reshape(-1, width), k_token)

  def block_local(x, block=64):  # top-k inside blocks of 64: cheap, not the per-sample rule
    kb = max(1, round(block * k_sample / x.shape[1]))
    return lax.top_k(jnp.abs(x).reshape(-1, block), kb)[1]

  return {"per-sample lax.top_k": per_sample_top_k, "per-token lax.top_k": per_token_top_k,
          "approx_max_k": approx_max_k, "bit threshold (sample)": threshold_bits,
          "bit threshold (token)": threshold_bits_token, "block-local top_k (64)": block_local}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", default="32,197,768")
  parser.add_argument("--prune_ratio", type=float, default=0.9)
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  shape = tuple(int(s) for s in args.shape.split(","))
  groups, n = shape[0], math.prod(shape[1:])
  x = jax.random.normal(jax.random.PRNGKey(0), (groups, n), jnp.float32)
  k_sample = compress.keep_count(n, args.prune_ratio)
  k_token = compress.keep_count(shape[-1], args.prune_ratio)
  print(f"backend={jax.default_backend()} shape={shape} prune_ratio={args.prune_ratio}")
  print(f"{'method':26s} {'ms':>8s} {'temp MiB':>9s}")
  for name, fn in _methods(k_sample, k_token, shape[-1]).items():
    jitted = jax.jit(fn)
    jax.block_until_ready(jitted(x))
    times = []
    for _ in range(args.repeats):
      start = time.perf_counter()
      jax.block_until_ready(jitted(x))
      times.append(time.perf_counter() - start)
    temp = memory.compiled_memory(jitted, x).temp_bytes
    print(f"{name:26s} {1e3 * np.median(times):8.1f} {temp / 2**20:9.1f}", flush=True)


if __name__ == "__main__":
  main()
