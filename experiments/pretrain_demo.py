"""Pretrains the demo's small ViT on digits 0-4 and writes it as a public-format .npz.

  python experiments/pretrain_demo.py [--out experiments/assets/vit_demo_digits.npz]

The demo (`experiments/finetune.py --config demo`) fine-tunes this checkpoint on the
other digits (5-9), the way the public ViTs pretrained on ImageNet-21k are fine-tuned
on CUB or Flowers. Plain full training (no pruning), AdamW, fixed seed; 2-6 minutes on 2 CPU cores.
The committed file was written by this script with its defaults; it reached 100%
held-out accuracy on digits 0-4 (168 test images).
"""
import argparse
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from razor_jax import data
from razor_jax.models import vit

# The demo config's model (experiments/configs/demo.py): 32x32 images, 4x4 patches.
SIZES = dict(patch_size=4, hidden_size=64, mlp_dim=128, num_heads=4, num_layers=4)
DATASET = "digits_demo/pretrain"
IMAGE_SIZE = 32


def train(steps: int, batch_size: int, lr: float, seed: int, data_dir=None):
  model = vit.ViT(data.num_classes(DATASET), prune_ratio=0.0, **SIZES)  # plain training
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1, IMAGE_SIZE, IMAGE_SIZE, 3)))
  params = params["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, lr, steps // 10, steps)
  tx = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(schedule, weight_decay=1e-4))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, images, labels):
    def loss_fn(p):
      logits = model.apply({"params": p}, images, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  batches = data.train_batches(DATASET, batch_size=batch_size, image_size=IMAGE_SIZE,
                               seed=seed, data_dir=data_dir)
  start = time.time()
  for i in range(steps):
    batch = next(batches)
    params, opt_state, loss = step(params, opt_state, batch["image"], batch["label"])
    if (i + 1) % 100 == 0:
      print(f"step {i + 1}/{steps} loss {float(loss):.4f} ({time.time() - start:.0f}s)",
            flush=True)
  return model, params


def accuracy(model, params, data_dir=None) -> float:
  predict = jax.jit(lambda p, x: jnp.argmax(model.apply({"params": p}, x), -1))
  correct = total = 0
  for batch in data.eval_batches(DATASET, batch_size=128, image_size=IMAGE_SIZE,
                                 data_dir=data_dir):
    hit = np.asarray(predict(params, batch["image"])) == batch["label"]
    correct += float(np.sum(hit * batch["mask"]))
    total += float(np.sum(batch["mask"]))
  return correct / total


def main():
  here = os.path.dirname(os.path.abspath(__file__))
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--out", default=os.path.join(here, "assets", "vit_demo_digits.npz"))
  parser.add_argument("--steps", type=int, default=1500)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--lr", type=float, default=1e-3)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--data_dir", default=None)
  args = parser.parse_args()
  model, params = train(args.steps, args.batch_size, args.lr, args.seed, args.data_dir)
  print(f"held-out accuracy on digits 0-4: {accuracy(model, params, args.data_dir):.4f}")
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  vit.export(params, args.out)
  print(f"wrote {args.out} ({os.path.getsize(args.out) / 1e6:.2f} MB)")


if __name__ == "__main__":
  main()
