"""Compiled peak memory of one ViT fine-tuning step: full, remat and Back Razor.

  python experiments/vit_memory.py --variant L/16 --batch 128 [--methods full,remat,razor]

One SGD-momentum step (fp32 params, donated params and optimizer state, 224 px),
compiled but not run: peak = argument + output + temp - alias from XLA's memory
analysis, so ViT-L/16 at batch 128 is measured on a CPU machine too. These are the
figures of issue 3's memory targets.
"""
import argparse
import time

import jax
import jax.numpy as jnp
import optax

from razor_jax import memory
from razor_jax.models import vit

METHODS = {"full": dict(prune_ratio=0.0), "remat": dict(prune_ratio=0.0, remat=True),
           "razor": dict(prune_ratio=0.9)}


def step_peak(model, batch: int, image_size: int) -> memory.CompiledMemory:
  images = jax.ShapeDtypeStruct((batch, image_size, image_size, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(
      jax.random.PRNGKey(0), jnp.zeros((1, image_size, image_size, 3)))["params"])
  tx = optax.sgd(0.01, momentum=0.9)

  def step(p, o, x, y):
    def loss(p):
      logits = model.apply({"params": p}, x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    updates, o = tx.update(jax.grad(loss)(p), o, p)
    return optax.apply_updates(p, updates), o

  return memory.compiled_memory(jax.jit(step, donate_argnums=(0, 1)), params,
                                jax.eval_shape(tx.init, params), images, labels)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--variant", default="L/16", choices=sorted(vit.VARIANTS))
  parser.add_argument("--batch", type=int, default=128)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--num_classes", type=int, default=1000)
  parser.add_argument("--methods", default="full,remat,razor")
  parser.add_argument("--batch_chunk", type=int, default=32)
  args = parser.parse_args()
  print(f"backend={jax.default_backend()} ViT-{args.variant} batch={args.batch}")
  for name in args.methods.split(","):
    if name not in METHODS:
      parser.error(f"unknown method {name!r}; expected some of {sorted(METHODS)}")
    model = vit.ViT(args.num_classes, variant=args.variant, batch_chunk=args.batch_chunk,
                    **METHODS[name])
    start = time.time()
    peak = step_peak(model, args.batch, args.image_size)
    print(f"{name:6s} compiled peak {peak.peak_bytes / 2**30:7.2f} GiB"
          f"  (temp {peak.temp_bytes / 2**30:.2f} GiB, compiled in {time.time() - start:.0f}s)",
          flush=True)


if __name__ == "__main__":
  main()
