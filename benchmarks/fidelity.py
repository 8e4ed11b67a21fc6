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

Accuracy (`--accuracy`): transfer runs of the same policies on both demo tasks (digits
5-9, and all ten digits with a new head) through benchmarks/accuracy.py, resuming
whatever results/fidelity_accuracy_{demo,demo_all}.json already hold.

  python -m benchmarks.fidelity [--batches 3] [--no_memory] [--accuracy]
      [--no_fidelity] [--optimizers sgd,adam] [--steps 500,2000] [--seeds 0,1,2]
      [--methods "paper@0.9,razor@0.9 sample"] [--tasks demo,demo_all]

writes results/fidelity.json, then re-renders results/README.md (its section "Fidelity:
the paper preset, the defaults and the energy estimator").
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

# label -> policy. The ratios other than the default's keep their values as measured
# before the default moved to 0.8 (log4 on token rows, README "The default policy").
POLICIES = {
    "full": Policy(0.0),
    "paper preset (Policy.paper)": Policy.paper(0.9),
    "paper preset, fused LayerNorm": Policy.paper(0.9, layer_norm_mode="fused"),
    "per-sample groups (the paper's grouping)": Policy(0.9, granularity="sample"),
    "0.9, log4 (the default before 0.8)": Policy(0.9, value_format="log4"),
    "paper preset + energy": Policy.paper(0.9, estimator="energy"),
    "per-sample groups + energy": Policy(0.9, granularity="sample", estimator="energy"),
    "0.9, log4 + energy": Policy(0.9, value_format="log4", estimator="energy"),
    # Kept values in 1 bit (the sign, one mean magnitude per row): the bits log4 spends
    # on values buy more kept positions (README, "Kept values in one bit").
    "sign values at 0.9": Policy(0.9, value_format="sign"),
    "sign values at 0.85": Policy(0.85, value_format="sign"),
    "sign values at 0.8": Policy(0.8, value_format="sign"),
    "0.8, log4": Policy(0.8, value_format="log4"),
    "sign values at 0.8, attention log4": Policy(0.8, value_format="sign",
                                                   value_formats=(("attention", "log4"),)),
    # Only the softmax probabilities (never negative) keep magnitudes: log4's levels in 3
    # bits, the same gradients as log4 there.
    # The default: `Policy()`, i.e. the same.
    "default: 0.8, sign values, softmax ulog3": Policy(),
    # Its formats at the paper's ratio (`prune_ratio=0.9`).
    "0.9, the default's formats": Policy(0.9),
}
# What the memory stage compiles: case -> (variant, batch, image size, classes, policies).
# ViT-B/16 compiles take minutes each on a busy CPU, so fewer policies there.
MEMORY_CASES = {
    "demo ViT, batch 64, 32 px": (None, 64, 32, 5, (
        "full", "paper preset (Policy.paper)", "paper preset, fused LayerNorm",
        "per-sample groups (the paper's grouping)", "0.9, log4 (the default before 0.8)",
        "per-sample groups + energy", "sign values at 0.9", "sign values at 0.85",
        "sign values at 0.8", "0.8, log4", "default: 0.8, sign values, softmax ulog3",
        "0.9, the default's formats")),
    "ViT-B/16, batch 32, 224 px": ("B/16", 32, 224, 100, (
        "paper preset (Policy.paper)", "per-sample groups (the paper's grouping)",
        "0.9, log4 (the default before 0.8)", "sign values at 0.8", "0.8, log4",
        "default: 0.8, sign values, softmax ulog3")),
}
NEGLIGIBLE = 1e-6  # of the largest parameter's exact gradient norm
# Transfer tasks: label -> (config in experiments/configs, results file).
TASKS = {"digits 5-9 (demo)": ("demo", "fidelity_accuracy_demo.json"),
         "all ten digits, new head (demo_all)": ("demo_all", "fidelity_accuracy_demo_all.json")}
TASK_CONFIGS = tuple(config for config, _ in TASKS.values())
# The accuracy scope run by --accuracy (SGD first: its gap is the open question).
ACCURACY_METHODS = ("razor@0.9 energy", "paper@0.9", "razor@0.9 sample",
                    "razor@0.9 sample energy", "razor@0.9 attention 0.5",
                    "razor@0.9 attention 0.8", "razor@0.8", "razor@0.8 sign",
                    "razor@0.8 sign + attention log4", "razor@0.8 sign + softmax log4")
# (razor@0.8 sign + softmax ulog3, the default policy, computes softmax log4's gradients bit
# for bit: softmax log4's runs stand for it. --methods takes it, and any method of
# benchmarks.accuracy.FIDELITY_METHODS, by name.)
ACCURACY_SCOPE = dict(optimizers=("sgd", "adam"), steps=(500, 2000), seeds=(0, 1, 2),
                      methods=ACCURACY_METHODS, tasks=TASK_CONFIGS)


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


def fidelity_inputs(batches: int = 3, batch_size: int = 64) -> tuple:
  """(params, batches, exact gradients per batch): the demo checkpoint with its own head,
  `batches` real training batches of digits_demo, and the exact gradients on each."""
  from benchmarks import demo_data  # pylint: disable=g-import-not-at-top  (imports TF)
  init = jax.eval_shape(lambda: _model(Policy(0.0)).init(jax.random.key(0),
                                                          jnp.zeros((1, 32, 32, 3))))
  params = vit.load_pretrained(CHECKPOINT, init["params"], keep_head=True)
  data = [demo_data.train_batch(batch_size, seed=s) for s in range(batches)]
  exact_fn = _grad_fn(Policy(0.0))
  exact = [_leaves(exact_fn(params, b["image"], b["label"])) for b in data]
  return params, data, exact


def compare_policy(policy: Policy, params, data, exact) -> dict:
  """`compare`'s figures for `policy`'s gradients, averaged over the batches."""
  fn = _grad_fn(policy)
  per_batch = [compare(_leaves(fn(params, b["image"], b["label"])), e)
               for b, e in zip(data, exact)]
  return {k: float(np.mean([p[k] for p in per_batch])) for k in per_batch[0]}


def fidelity(batches: int = 3, batch_size: int = 64, say=print) -> dict:
  """label -> the `compare` figures of each of POLICIES, averaged over `batches` batches."""
  inputs = fidelity_inputs(batches, batch_size)
  out = {}
  for label, policy in POLICIES.items():
    began = time.monotonic()
    out[label] = compare_policy(policy, *inputs)
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
  lines = [f"Demo ViT at 0.9 unless the policy says, {doc['batches']} real batches of"
           f" {doc['batch_size']} digits;"
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


def accuracy_scope(narrowing: Optional[dict] = None) -> dict:
  """ACCURACY_SCOPE with `narrowing`'s fields in its place; a ValueError for a method or
  task it does not know, before anything runs. Methods may be any of
  benchmarks.accuracy.FIDELITY_METHODS; the grid's default is ACCURACY_METHODS."""
  from benchmarks import accuracy  # pylint: disable=g-import-not-at-top
  scope = {**ACCURACY_SCOPE, **(narrowing or {})}
  unknown = (set(scope["methods"]) - set(accuracy.FIDELITY_METHODS)) | (
      set(scope["tasks"]) - set(TASK_CONFIGS))
  if unknown:
    raise ValueError(f"unknown methods or tasks {sorted(unknown)}; expected methods from"
                     f" {tuple(accuracy.FIDELITY_METHODS)} and tasks from {list(TASK_CONFIGS)}")
  return scope


def run_accuracy(directory: str = RESULTS, scope: Optional[dict] = None, say=print):
  """The transfer runs of `scope` (default ACCURACY_SCOPE: every method, optimizer, step
  count and seed, on every task; resumable; hours on 2 CPU cores). `scope` may narrow
  any of optimizers, steps, seeds, methods (labels of accuracy.FIDELITY_METHODS) and tasks
  (configs of TASKS); full fine-tuning and razor@0.9 (log4 values, the former default)
  always run."""
  from benchmarks import accuracy  # pylint: disable=g-import-not-at-top
  from razor_jax.train import cli  # pylint: disable=g-import-not-at-top
  scope = accuracy_scope(scope)
  configs = os.path.join(HERE, os.pardir, "experiments", "configs")
  extra = {m: accuracy.FIDELITY_METHODS[m] for m in scope["methods"]}
  for optimizer in scope["optimizers"]:
    for steps in scope["steps"]:
      for config, name in TASKS.values():
        if config not in scope["tasks"]:
          continue
        base = cli.load_config(config, configs).to_dict()
        accuracy.sweep(base, os.path.join(directory, name), prune_ratios=(0.0, 0.9),
                       extra=extra, seeds=scope["seeds"], optimizers=(optimizer,),
                       total_steps=steps, say=say)


def accuracy_markdown(directory: str = RESULTS) -> list[str]:
  """Per task, top-1 of each method: mean ± std over the seeds run, gap to full."""
  from benchmarks import accuracy  # pylint: disable=g-import-not-at-top
  lines = []
  for task, (_, name) in TASKS.items():
    doc = accuracy.load(os.path.join(directory, name))
    if not doc or not doc.get("runs"):
      continue
    examples = doc["runs"][0]["eval_examples"]
    lines += [f"**{task}** ({examples} test images: one image is {100 / examples:.2f} points)",
              "", "| optimizer | steps | method | seeds | top-1 (%) | gap to full"
              " (± std of the per-seed gaps) |", "|---|---|---|---|---|---|"]
    for row in accuracy.summarize(doc["runs"]):
      gap = accuracy.gap_text(row)
      lines.append(f"| {row['optimizer']} | {row['total_steps']} | {row['method']} |"
                   f" {row['seeds']} | {row['top1_mean']:.2f} ± {row['top1_std']:.2f} | {gap} |")
    for note in doc.get("notes", []):
      lines += ["", note]
    lines.append("")
  return lines


def section(directory: str = RESULTS) -> list[str]:
  """results/README.md's section on issue 13's measurements (empty if none were made)."""
  doc = load(directory)
  acc = accuracy_markdown(directory)
  if not doc and not acc:
    return []
  lines = ["## Fidelity: the paper preset, the defaults and the energy estimator", "",
           "`Policy.paper(0.9)` is the original PyTorch code's rule op by op (threshold keep",
           "with ties, float16 values, LayerNorm input and output pruned separately, float16",
           "GELU input); the defaults fuse each LayerNorm with its projections (one packed",
           "copy of x_hat). \"energy\" scales each group's pruned copy by |a|^2 / |a_kept|^2",
           "in weight gradients only. \"sign values\" store each kept value's sign and one",
           "mean magnitude per row (value_format=\"sign\", 1 bit instead of log4's 4), at the",
           "prune ratio named. Regenerated by `python -m benchmarks.fidelity",
           "--accuracy` (fidelity, memory, then the resumable transfer runs).", ""]
  if doc:
    lines += markdown(doc)
  if acc:
    lines += ["Transfer accuracy of these policies (SGD momentum 0.9 lr 0.03 / Adam lr 1e-3,",
              "the demo's schedule; the rows are what has been run so far). The gap's ±",
              "is the std of the per-seed gaps: a seed fixes the initialization, data order",
              "and dropout of both runs, so its luck cancels there.", "", *acc]
  return lines


def load(directory: str = RESULTS) -> Optional[dict]:
  path = os.path.join(directory, FIDELITY_JSON)
  if not os.path.exists(path):
    return None
  with open(path, encoding="utf-8") as f:
    return json.load(f)


def _scope(args) -> dict:
  """The command line's narrowing of ACCURACY_SCOPE."""
  scope = {}
  for field, kind in (("optimizers", str), ("steps", int), ("seeds", int), ("methods", str),
                      ("tasks", str)):
    value = getattr(args, field)
    if value is not None:
      scope[field] = tuple(kind(v) for v in value.split(",") if v.strip())
  return scope


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, default=3)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--no_memory", action="store_true")
  parser.add_argument("--accuracy", action="store_true",
                      help="also run the transfer runs of ACCURACY_SCOPE (hours; resumable)")
  parser.add_argument("--out", default=os.path.join(RESULTS, FIDELITY_JSON))
  # Narrow --accuracy's grid (comma lists); the full grid is the default.
  parser.add_argument("--optimizers", help=f"default {','.join(ACCURACY_SCOPE['optimizers'])}")
  parser.add_argument("--steps", help="default " + ",".join(map(str, ACCURACY_SCOPE["steps"])))
  parser.add_argument("--seeds", help="default " + ",".join(map(str, ACCURACY_SCOPE["seeds"])))
  parser.add_argument("--methods", help=f"besides full and razor@0.9, from {ACCURACY_METHODS};"
                      " default all; '' for none")
  parser.add_argument("--tasks", help="default " + ",".join(TASK_CONFIGS))
  parser.add_argument("--no_fidelity", action="store_true",
                      help="keep results/fidelity.json as it is (with --accuracy)")
  args = parser.parse_args(argv)
  # Checked first: a misspelt name must not wait for the fidelity stage's minutes.
  scope = accuracy_scope(_scope(args)) if args.accuracy else None
  directory = os.path.dirname(os.path.abspath(args.out))
  if not args.no_fidelity:
    doc = {"batches": args.batches, "batch_size": args.batch_size,
           "fidelity": fidelity(args.batches, args.batch_size)}
    if not args.no_memory:
      doc["memory"] = memory_table()
    elif os.path.exists(args.out):  # --no_memory reruns fidelity only: the memory stays
      with open(args.out, encoding="utf-8") as f:
        kept = json.load(f).get("memory")
      if kept:
        doc["memory"] = kept
    records.write_json(args.out, doc)
    print("\n".join(markdown(doc)))
  if args.accuracy:
    run_accuracy(directory, scope)
  from benchmarks import render  # pylint: disable=g-import-not-at-top
  render.write(directory, plots=False)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
