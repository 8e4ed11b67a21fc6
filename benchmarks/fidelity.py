"""Gradient fidelity and memory per policy: the paper preset, the defaults, the estimator.

Fidelity: on the demo ViT (pretrained on digits 0-4, its own 5-class head) and real
digit batches (digits_demo's first augmented training batches), each policy's
gradients against exact ones, per parameter of the encoder blocks (layers unstacked):
the cosine and the norm ratio |g| / |g_exact|, averaged over parameters and batches,
and the same two for the whole backbone (every block parameter in one vector).
Parameters whose exact gradient is negligible (the key bias) are left out.

Memory: XLA:CPU's compiled peak of one gradient evaluation (params and batch in,
gradients out; no optimizer) of the demo ViT at batch 64 and of ViT-B/16 at batch 32,
224 px, 100 classes. No GPU compile here: this is run without one.

  python -m benchmarks.fidelity [--batches 3] [--no_memory]

writes results/fidelity.json; `benchmarks.render` puts its tables in results/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

from benchmarks import records
from razor_jax import Policy
from razor_jax.models import vit
from flax import traverse_util

from razor_jax.models.vit_checkpoint import unstack_blocks

HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, os.pardir, "results")
CHECKPOINT = os.path.join(HERE, os.pardir, "experiments", "assets", "vit_demo_digits.npz")
DEMO_SIZES = dict(patch_size=4, hidden_size=64, mlp_dim=128, num_heads=4, num_layers=4)
FIDELITY_JSON = "fidelity.json"

# label -> policy; "sample" and "token" named, as a CPU run of "auto" resolves to sample.
POLICIES = {
    "full": Policy(0.0),
    "paper preset (Policy.paper)": Policy.paper(0.9),
    "paper preset, fused LayerNorm": Policy.paper(0.9, layer_norm_mode="fused"),
    "default, CPU (sample groups)": Policy(0.9, granularity="sample"),
    "default, GPU (token rows, log4)": Policy(0.9, granularity="token"),
    "paper preset + energy": Policy.paper(0.9, estimator="energy"),
    "default CPU + energy": Policy(0.9, granularity="sample", estimator="energy"),
    "default GPU + energy": Policy(0.9, granularity="token", estimator="energy"),
}
# What the memory stage compiles: case -> (variant, batch, image size, classes, policies).
# ViT-B/16 compiles take minutes each on a busy CPU, so fewer policies there.
MEMORY_CASES = {
    "demo ViT, batch 64, 32 px": (None, 64, 32, 5, (
        "full", "paper preset (Policy.paper)", "paper preset, fused LayerNorm",
        "default, CPU (sample groups)", "default, GPU (token rows, log4)",
        "default CPU + energy")),
    "ViT-B/16, batch 32, 224 px": ("B/16", 32, 224, 100, (
        "paper preset (Policy.paper)", "default, CPU (sample groups)",
        "default, GPU (token rows, log4)")),
}
NEGLIGIBLE = 1e-6  # of the largest parameter's exact gradient norm


def _model(policy: Policy, **kw):
  return vit.ViT(num_classes=kw.pop("num_classes", 5), policy=policy, **{**DEMO_SIZES, **kw})


def _grad_fn(policy: Policy):
  model = _model(policy)

  def loss(params, images, labels):
    logits = model.apply({"params": params}, images, train=False)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return jax.jit(jax.grad(loss))


def _leaves(tree) -> dict:
  flat = traverse_util.flatten_dict(tree, sep="/")
  return {k: np.asarray(v, np.float64) for k, v in unstack_blocks(flat).items()
          if "encoderblock" in k}


def compare(grads: dict, exact: dict) -> dict:
  """Mean / min cosine and mean norm ratio over parameters; backbone cosine and ratio."""
  floor = NEGLIGIBLE * max(np.linalg.norm(e) for e in exact.values())
  cos, ratio = [], []
  for k, e in exact.items():
    g, ne = grads[k], np.linalg.norm(e)
    if ne <= floor:
      continue
    ng = np.linalg.norm(g)
    cos.append(float(g.ravel() @ e.ravel() / (ng * ne)) if ng else 0.0)
    ratio.append(float(ng / ne))
  g_all = np.concatenate([grads[k].ravel() for k in exact])
  e_all = np.concatenate([exact[k].ravel() for k in exact])
  return {"mean_cosine": float(np.mean(cos)), "min_cosine": float(np.min(cos)),
          "mean_norm_ratio": float(np.mean(ratio)),
          "backbone_cosine": float(g_all @ e_all / np.linalg.norm(g_all) / np.linalg.norm(e_all)),
          "backbone_norm_ratio": float(np.linalg.norm(g_all) / np.linalg.norm(e_all))}


def fidelity(batches: int = 3, batch_size: int = 64, say=print) -> dict:
  """label -> the `compare` figures averaged over `batches` real batches."""
  from benchmarks import demo_data  # pylint: disable=g-import-not-at-top  (imports TF)
  init = jax.eval_shape(lambda: _model(Policy(0.0)).init(jax.random.key(0),
                                                          jnp.zeros((1, 32, 32, 3))))
  params = vit.load_pretrained(CHECKPOINT, init["params"], keep_head=True)
  data = [demo_data.train_batch(batch_size, seed=s) for s in range(batches)]
  exact_fn = _grad_fn(Policy(0.0))
  exact = [_leaves(exact_fn(params, b["image"], b["label"])) for b in data]
  out = {}
  for label, policy in POLICIES.items():
    began = time.monotonic()
    fn = _grad_fn(policy)
    per_batch = [compare(_leaves(fn(params, b["image"], b["label"])), e)
                 for b, e in zip(data, exact)]
    out[label] = {k: float(np.mean([p[k] for p in per_batch])) for k in per_batch[0]}
    say(f"{label}: {out[label]} ({time.monotonic() - began:.0f} s)")
  return out


def compiled_peak_mib(policy: Policy, variant: Optional[str], batch: int, image: int,
                      num_classes: int) -> float:
  """XLA's compiled peak of one gradient evaluation, in MiB (nothing runs)."""
  from razor_jax import memory  # pylint: disable=g-import-not-at-top
  kw = dict(variant=variant, num_classes=num_classes) if variant else dict(
      num_classes=num_classes)
  model = _model(policy, **kw)
  images = jax.ShapeDtypeStruct((batch, image, image, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  params = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, image, image, 3))))

  def grad(p, x, y):
    return jax.grad(lambda q: optax.softmax_cross_entropy_with_integer_labels(
        model.apply(q, x, train=True), y).mean())(p)
  return memory.compiled_memory(grad, params, images, labels).peak_bytes / 2**20


def memory_table(say=print) -> dict:
  out = {}
  for case, (variant, batch, image, classes, labels) in MEMORY_CASES.items():
    out[case] = {}
    for label in labels:
      began = time.monotonic()
      out[case][label] = compiled_peak_mib(POLICIES[label], variant, batch, image, classes)
      say(f"{case} {label}: {out[case][label]:.1f} MiB ({time.monotonic() - began:.0f} s)")
  return out


def markdown(doc: dict) -> list[str]:
  """The fidelity and memory tables of results/fidelity.json, as markdown lines."""
  lines = [f"Demo ViT at 0.9, {doc['batches']} real batches of {doc['batch_size']} digits;"
           " per encoder parameter against exact gradients (`python -m benchmarks.fidelity`).",
           "", "| policy | mean cosine | min cosine | mean norm ratio | backbone cosine |"
           " backbone norm ratio |", "|---|---|---|---|---|---|"]
  for label, f in doc["fidelity"].items():
    lines.append(f"| {label} | {f['mean_cosine']:.3f} | {f['min_cosine']:.3f} |"
                 f" {f['mean_norm_ratio']:.3f} | {f['backbone_cosine']:.3f} |"
                 f" {f['backbone_norm_ratio']:.3f} |")
  if doc.get("memory"):
    cases = list(doc["memory"])
    lines += ["", "Compiled peak of one gradient evaluation (XLA:CPU, MiB; no optimizer):", "",
              "| policy | " + " | ".join(cases) + " |", "|---" * (len(cases) + 1) + "|"]
    for label in doc["memory"][cases[0]]:
      cells = [doc["memory"][c].get(label) for c in cases]
      lines.append(f"| {label} | " + " | ".join("–" if v is None else f"{v:.1f}"
                                               for v in cells) + " |")
  return lines + [""]


def load(directory: str = RESULTS) -> Optional[dict]:
  path = os.path.join(directory, FIDELITY_JSON)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--no_memory", action="store_true")
  parser.add_argument("--out", default=os.path.join(RESULTS, FIDELITY_JSON))
  args = parser.parse_args(argv)
  doc = {"batches": args.batches, "batch_size": args.batch_size,
         "fidelity": fidelity(args.batches, args.batch_size)}
  if not args.no_memory:
    doc["memory"] = memory_table()
  records.write_json(args.out, doc)
  print("\n".join(markdown(doc)))
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
