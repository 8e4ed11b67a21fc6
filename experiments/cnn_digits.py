"""The CNN transfer demo, offline: the tiny CNN pretrained on digits 0-4, fine-tuned on 5-9.

    python experiments/cnn_digits.py                      # pretrain (if needed), transfer
    python experiments/cnn_digits.py --steps 300 --seeds 0 1 2

scikit-learn's handwritten digits (razor_jax.data.digits_demo's split: image i is a test
image when i % 5 == 4) at 16 px. Pretraining (full fine-tuning, Adam) writes
experiments/assets/cnn_demo_digits.npz; each transfer run starts from it with a fresh
5-class head and trains every method of benchmarks/cnn.py with Adam and SGD, then
reports test accuracy (BatchNorm on its running statistics) to results/cnn_digits.json.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import cnn  # noqa: E402

SIZE = 16
ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "cnn_demo_digits.npz")
METHODS = ("full", "razor@0.8", "razor@0.9", "actnn", "tinytl_b", "tinytl_lb")


def load_digits():
  """{"pretrain"|"finetune": {"train"|"test": (images in [-1, 1], labels 0-4)}}."""
  from sklearn.datasets import load_digits as sk_digits  # pylint: disable=g-import-not-at-top
  from razor_jax.data.digits_demo import to_rgb  # pylint: disable=g-import-not-at-top
  d = sk_digits()
  images = np.stack([to_rgb(im, SIZE) for im in d.images]).astype(np.float32) / 127.5 - 1.0
  test = np.arange(len(d.target)) % 5 == 4
  out = {}
  for name, low in (("pretrain", 0), ("finetune", 5)):
    keep = (d.target >= low) & (d.target < low + 5)
    out[name] = {split: (images[keep & sel], (d.target[keep & sel] - low).astype(np.int32))
                 for split, sel in (("train", ~test), ("test", test))}
  return out


def _variables(case):
  return case.model().init(jax.random.key(0), jnp.zeros((1, SIZE, SIZE, 3)))


def train(case, params, stats, data, steps, tx, seed):
  model = case.model()
  mask = traverse_util.unflatten_dict(cnn.trainable_mask(case, params))
  tx = optax.chain(optax.masked(tx, mask),
                   optax.masked(optax.set_to_zero(), jax.tree.map(lambda m: not m, mask)))
  opt_state = tx.init(params)

  @jax.jit
  def step(params, stats, opt_state, x, y):
    def loss(p):
      logits, upd = model.apply({"params": p, "batch_stats": stats}, x, train=True,
                                mutable=["batch_stats"])
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y)), upd
    (value, upd), grads = jax.value_and_grad(loss, has_aux=True)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), upd["batch_stats"], opt_state, value

  x_all, y_all = data
  rng = np.random.default_rng(seed)
  for _ in range(steps):
    idx = rng.integers(0, len(y_all), case.batch)
    params, stats, opt_state, _ = step(params, stats, opt_state, x_all[idx], y_all[idx])
  return params, stats


def accuracy(case, params, stats, data) -> float:
  logits = jax.jit(lambda p, s, x: case.model().apply({"params": p, "batch_stats": s}, x))(
      params, stats, data[0])
  return float(np.mean(np.argmax(logits, -1) == data[1]))


def pretrain(digits, steps=1500):
  case = cnn.CnnCase("tiny", "full", 32, SIZE, 5)
  v = _variables(case)
  params, stats = train(case, v["params"], v["batch_stats"], digits["pretrain"]["train"], steps,
                        optax.adam(2e-3), 0)
  acc = accuracy(case, params, stats, digits["pretrain"]["test"])
  flat = {"params/" + "/".join(k): np.asarray(a)
          for k, a in traverse_util.flatten_dict(params).items()}
  flat.update({"batch_stats/" + "/".join(k): np.asarray(a)
               for k, a in traverse_util.flatten_dict(stats).items()})
  os.makedirs(os.path.dirname(ASSET), exist_ok=True)
  np.savez(ASSET, **flat)
  print(f"pretrained on digits 0-4: test accuracy {acc:.3f} -> {ASSET}", flush=True)


def load_pretrained():
  with np.load(ASSET) as f:
    flat = {tuple(k.split("/")): f[k] for k in f.files}
  tree = traverse_util.unflatten_dict(flat)
  return tree["params"], tree["batch_stats"]


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=300)
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0])
  parser.add_argument("--methods", nargs="+", default=list(METHODS))
  parser.add_argument("--optimizers", nargs="+", default=["adam", "sgd"])
  parser.add_argument("--adam_lr", type=float, default=1e-3)
  parser.add_argument("--sgd_lr", type=float, default=0.05)  # momentum 0.9
  parser.add_argument("--out", default="results/cnn_digits.json")
  args = parser.parse_args(argv)
  digits = load_digits()
  if not os.path.exists(ASSET):
    pretrain(digits)
  base_params, base_stats = load_pretrained()
  optimizers = {"adam": lambda: optax.adam(args.adam_lr),
                "sgd": lambda: optax.sgd(args.sgd_lr, momentum=0.9)}
  optimizers = {k: optimizers[k] for k in args.optimizers}
  rows = []
  for method in args.methods:
    for opt_name, make_tx in optimizers.items():
      for seed in args.seeds:
        case = cnn.CnnCase("tiny", method, args.batch, SIZE, 5)
        v = _variables(case)
        head = 0.01 * jax.random.normal(jax.random.key(seed), v["params"]["predictions"]["kernel"].shape)
        params = {**v["params"], **base_params,
                  "predictions": {"kernel": head, "bias": jnp.zeros(5)}}
        start = time.time()
        params, stats = train(case, params, {**v["batch_stats"], **base_stats}, digits["finetune"]["train"],
                              args.steps, make_tx(), seed)
        acc = accuracy(case, params, stats, digits["finetune"]["test"])
        lr = args.adam_lr if opt_name == "adam" else args.sgd_lr
        rows.append(dict(method=method, optimizer=opt_name, lr=lr, seed=seed, batch=args.batch,
                         steps=args.steps, test_accuracy=acc, seconds=round(time.time() - start)))
        print(rows[-1], flush=True)
        os.makedirs(os.path.dirname(args.out) or ".", exist_ok=True)
        with open(args.out, "w") as f:
          json.dump(rows, f, indent=1)


if __name__ == "__main__":
  main()
