"""Compares ways of selecting and compacting the top-K magnitudes of an activation.

  python experiments/bench_selection.py [--shape 32,197,768 --shape 32,197,3072]
                                        [--prune_ratio 0.9] [--repeats 7]

Selection methods return the kept-element mask (or what it needs to build one);
compaction methods turn the mask into the K kept values in a static (groups, K)
array. Printed per method: the median and minimum ms over jitted calls (methods run
interleaved, so a busy machine slows all of them alike) and XLA's compiled temp
bytes. razor_jax uses the sampled-bracket bit threshold and the gather compaction
(`razor_jax.packed.pack`): fastest here, exact K per group, transients a fraction of the
input.
"""
import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from razor_jax import codecs, memory, packed, selection


def _selection(k_sample, k_token, width):
  def per_sample_top_k(x):  # sort-based, over the whole sample
    return lax.top_k(jnp.abs(x), k_sample)[1]

  def per_token_top_k(x):  # sort-based, one short row at a time
    return lax.top_k(jnp.abs(x).reshape(-1, width), k_token)[1]

  def approx_max_k(x):  # TPU-approximate; exact sort elsewhere
    return lax.approx_max_k(jnp.abs(x), k_sample)[1]

  def bits_whole_group(x):  # 31 compare-and-count passes over the whole group
    t, cut = selection.threshold_full(x, k_sample)
    return t, cut

  def bits_bracketed(x):  # razor_jax: sampled bracket, search among ~2% candidates
    return selection.threshold(x, k_sample)

  def bits_bracketed_bitmask(x):  # the same, and the kept set packed as a bitmask
    return selection.topk_words(x, k_sample)

  def bits_token(x):
    return selection.topk_words(x.reshape(-1, width), k_token)

  def block_local(x, block=64):  # top-k inside blocks of 64: cheap, not the per-sample rule
    kb = max(1, round(block * k_sample / x.shape[1]))
    return lax.top_k(jnp.abs(x).reshape(-1, block), kb)[1]

  return {"per-sample lax.top_k": per_sample_top_k, "per-token lax.top_k": per_token_top_k,
          "approx_max_k": approx_max_k, "bits, whole group": bits_whole_group,
          "bits, sampled bracket": bits_bracketed,
          "  + bitmask": bits_bracketed_bitmask, "bits (token) + bitmask": bits_token,
          "block-local top_k (64)": block_local}


def _compaction(k):
  def scatter_n(x, words):  # each of the n elements scatters to its slot or drops
    groups, n = x.shape
    kept = codecs.bitmask_to_mask(words, n)
    slot = jnp.cumsum(kept, axis=1, dtype=jnp.int32) - 1
    rows = jnp.arange(groups, dtype=jnp.int32)[:, None]
    target = jnp.where(kept, rows * k + slot, groups * k).reshape(-1)
    return jnp.zeros((groups * k,), x.dtype).at[target].set(
        x.reshape(-1), mode="drop", unique_indices=True).reshape(groups, k)

  def select_gather_k(x, words):  # razor_jax: per-slot search, then a gather of K
    pos, _, _ = codecs.select(words, k, x.shape[1])
    return jnp.take_along_axis(x, pos, axis=1)

  return {"scatter n (prefix sum)": scatter_n, "select + gather K": select_gather_k}


def _time(jitted, args, repeats):
  """Interleaved timing: one call of each method per round."""
  for fn in jitted.values():
    jax.block_until_ready(fn(*args))
  times = {name: [] for name in jitted}
  for _ in range(repeats):
    for name, fn in jitted.items():
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      times[name].append(time.perf_counter() - start)
  return times


def _report(methods, args, repeats):
  jitted = {name: jax.jit(fn) for name, fn in methods.items()}
  times = _time(jitted, args, repeats)
  for name, fn in jitted.items():
    temp = memory.compiled_memory(fn, *args).temp_bytes
    print(f"  {name:26s} {1e3 * np.median(times[name]):8.1f} {1e3 * np.min(times[name]):8.1f}"
          f" {temp / 2**20:9.1f}", flush=True)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--shape", action="append",
                      help="activation shape, batch first (repeatable);"
                           " default: the ViT-B/16 MLP inputs 32,197,768 and 32,197,3072")
  parser.add_argument("--prune_ratio", type=float, default=0.9)
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  print(f"backend={jax.default_backend()} prune_ratio={args.prune_ratio}")
  for spec in args.shape or ["32,197,768", "32,197,3072"]:
    shape = tuple(int(s) for s in spec.split(","))
    groups, n = shape[0], math.prod(shape[1:])
    x = jax.random.normal(jax.random.PRNGKey(0), (groups, n), jnp.float32)
    k_sample = packed.keep_count(n, args.prune_ratio)
    k_token = packed.keep_count(shape[-1], args.prune_ratio)
    print(f"shape={shape} ({x.nbytes / 2**20:.0f} MiB)")
    print(f"  {'selection':26s} {'median ms':>8s} {'min ms':>8s} {'temp MiB':>9s}")
    _report(_selection(k_sample, k_token, shape[-1]), (x,), args.repeats)
    print(f"  {'compaction':26s} {'median ms':>8s} {'min ms':>8s} {'temp MiB':>9s}")
    words = jax.jit(selection.topk_words, static_argnums=1)(x, k_sample)
    _report(_compaction(k_sample), (x, words), args.repeats)


if __name__ == "__main__":
  main()
