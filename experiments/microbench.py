"""Forward + backward time of each razor op over its plain op, at ViT-B/16 shapes.

  python experiments/microbench.py [--batch 32] [--prune_ratio 0.9] [--granularity sample]
                                   [--repeats 7] [--only dense]

Prints one line per op: plain and razor ms (medians of jitted fwd+bwd calls after
warm-up), their ratio, and the ratio of the fastest calls. Plain and razor calls
alternate, so a machine busy with other work slows both alike; on a shared machine
the min ratio is the steadier figure. Then the stored bits per element of a packed
activation at 0.8 / 0.9 / 0.95 / 0.97 for each storage format.
"""
import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from razor_jax import ops, packed
from razor_jax.ops import PackSpec


def _times_ms(fns, args, repeats):
  """Per function, the ms of each of `repeats` calls, the functions taking turns."""
  for fn in fns:
    jax.block_until_ready(fn(*args))
  times = [[] for _ in fns]
  for _ in range(repeats):
    for fn, out in zip(fns, times):
      start = time.perf_counter()
      jax.block_until_ready(fn(*args))
      out.append(1e3 * (time.perf_counter() - start))
  return times


def _fwd_bwd(op):
  def run(*args):
    out, vjp = jax.vjp(op, *args)
    return vjp(jnp.ones_like(out))
  return jax.jit(run)


def cases(batch, tokens=197, width=768, hidden=3072, heads=12):
  key = iter(jax.random.split(jax.random.PRNGKey(0), 16))
  rand = lambda *shape: jax.random.normal(next(key), shape, jnp.float32)
  x, h = rand(batch, tokens, width), rand(batch, tokens, hidden)
  q, k = rand(batch, tokens, heads, width // heads), rand(batch, tokens, heads, width // heads)
  logits = rand(batch, heads, tokens, tokens)
  conv_kw = dict(window_strides=(1, 1), padding="SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return {
      "dense 768->3072 (fc1)": (lambda s: functools.partial(ops.dense, spec=s),
                                (x, rand(width, hidden), rand(hidden))),
      "dense 3072->768 (fc2)": (lambda s: functools.partial(ops.dense, spec=s),
                                (h, rand(hidden, width), rand(width))),
      "qkv (one packed input)": (lambda s: lambda a, ks, bs: sum(ops.dense_multi(a, ks, bs, s)),
                                 (x, (rand(width, width),) * 3, (rand(width),) * 3)),
      "attention logits QK^T": (lambda s: functools.partial(ops.attention_logits, spec=s), (q, k)),
      "softmax . V": (lambda s: functools.partial(ops.softmax_attend, spec=s), (logits, q)),
      "layer_norm": (lambda s: functools.partial(ops.layer_norm, spec=s),
                     (x, rand(width), rand(width))),
      "gelu (uint8 derivative)": (lambda s: (lambda a: jax.nn.gelu(a)) if s is None
                                  else (lambda a: ops.gelu(a, True, "uint8")), (h,)),
      "conv 3x3 (56x56x64)": (lambda s: functools.partial(ops.conv, spec=s, **conv_kw),
                              (rand(batch, 56, 56, 64), rand(3, 3, 64, 64), rand(64))),
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--prune_ratio", type=float, default=0.9)
  parser.add_argument("--granularity", default="sample", choices=["sample", "token"])
  parser.add_argument("--repeats", type=int, default=7)
  parser.add_argument("--only", default="", help="run only ops whose name contains this")
  args = parser.parse_args()
  spec = PackSpec(args.prune_ratio, args.granularity)
  print(f"backend={jax.default_backend()} batch={args.batch} prune_ratio={args.prune_ratio}"
        f" granularity={args.granularity}")
  print(f"{'op':28s} {'plain ms':>9s} {'razor ms':>9s} {'ratio':>6s} {'min ratio':>9s}")
  for name, (make, op_args) in cases(args.batch).items():
    if args.only not in name:
      continue
    plain, razor = _times_ms([_fwd_bwd(make(None)), _fwd_bwd(make(spec))], op_args,
                             args.repeats)
    p, r = float(np.median(plain)), float(np.median(razor))
    print(f"{name:28s} {p:9.1f} {r:9.1f} {r / p:6.2f} {min(razor) / min(plain):9.2f}",
          flush=True)
  _print_bits((args.batch, 197, 768), args.granularity)


def _print_bits(shape, granularity):
  """Stored bits per element of one packed (batch, 197, 768) activation, by format."""
  formats = {"bitmask/indices + bf16": {}, "elias_fano + bf16": dict(position_format="elias_fano"),
             "bitmask/indices + int8": dict(value_format="int8")}
  ratios = (0.8, 0.9, 0.95, 0.97)
  print(f"\nbits per element of a packed {shape} float32 activation ({granularity}):")
  print(f"{'format':28s} " + " ".join(f"{r:>6g}" for r in ratios))
  for name, kw in formats.items():
    bits = [packed.bits_per_element(shape, r, granularity, **kw) for r in ratios]
    print(f"{name:28s} " + " ".join(f"{b:6.2f}" for b in bits))


if __name__ == "__main__":
  main()
