"""CNN fine-tuning methods side by side: saved-activation bytes and compiled peaks.

The methods of the paper's CNN tables (appendix Tables 2-5), as fields of
`razor_jax.models.mobilenet.CNN`:

  full        full fine-tuning, BatchNorm trained in train mode (plain autodiff).
  razor@R     Back Razor as the original CNN runs (`--transfer_learning_method full_noBN
              --backRazor`): every conv and the classifier keep their input pruned at R,
              ReLU6 a 1-bit mask, BatchNorm fixed (running statistics, no gradient); the
              default policy (image rows, 4-bit log values, Elias-Fano positions).
              razor_sample@R (the original's per-sample groups), razor_sample_ef@R,
              razor_energy@R, razor_sample_energy@R: other groups, storage or estimator
              (RAZOR_VARIANTS).
  actnn       ActNN-style: conv, classifier and train-mode BatchNorm inputs in 2 bits per
              element (groups of 256, stochastic rounding), ReLU6 a 1-bit mask.
  full_bnfixed, actnn_bnfixed
              the same with BatchNorm fixed (running statistics), as razor runs it; at
              batch 1 the batch statistics of the last, 1x1 maps are degenerate.
  tinytl_b    TinyTL-B: biases and the classifier only, BatchNorm frozen.
  tinytl_lb   TinyTL-L+B: TinyTL-B plus a lite residual branch per block.

"Saved-activation bytes" are what the backward keeps of one step's activations, read
from the traced gradient (`saved_residuals`: every residual that is not a parameter),
at the batch given: the accounting of the paper's Tables 2-4 (TinyTL's convention).
`paper_total_bytes` adds, as TinyTL's profiler does, trainable params at 32 bits and
frozen ones at 8 bits.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

import jax
import jax.numpy as jnp
import optax
from flax import traverse_util
from jax._src import ad_checkpoint  # saved_residuals: public as print_saved_residuals only

from razor_jax import memory
from razor_jax.models import mobilenet
from razor_jax.policy import Policy

BASE_METHODS = ("full", "full_bnfixed", "full_bnfrozen", "actnn", "actnn_bnfixed", "tinytl_b",
                "tinytl_lb")
# Back Razor's variants: name -> Policy fields. Plain "razor" is the default policy: image
# rows (`ops.map_row_ndim`), 4-bit log values, Elias-Fano positions, on every backend.
RAZOR_VARIANTS = {
    "razor": {},
    # The original's groups: each sample's whole map, bfloat16 values in 15 bits, bitmask
    # or index positions (the CPU default until image rows measured better).
    "razor_sample": dict(granularity="sample"),
    "razor_sample_ef": dict(granularity="sample", position_format="elias_fano"),
    "razor_energy": dict(estimator="energy"),  # the SGD estimator option (Policy)
    "razor_sample_energy": dict(granularity="sample", estimator="energy"),
    # BatchNorm inputs (the policy's "layer_norm" entry) kept at half; with "_bn" only.
    "razor_halfnorm": dict(ratios=(("layer_norm", 0.5),)),
}
# A variant name + "_bn" (razor_bn@0.9, razor_sample_bn@0.9): the same policy with BatchNorm
# trained in batch-statistics mode as `full` trains it, its input pruned like a conv's
# (`conv_ops.batch_norm_train`); beyond the original, which fixes BatchNorm.
BN_TRAIN_SUFFIX = "_bn"
# A variant name + "_bnfrozen": BatchNorm on its running statistics with its scale and bias
# trained (mobilenet's batch_norm="frozen"; the scale's gradient reads the pruned input).
BN_FROZEN_SUFFIX = "_bnfrozen"


@dataclasses.dataclass(frozen=True)
class CnnCase:
  arch: str = "proxyless_mobile"
  method: str = "razor@0.9"
  batch: int = 8
  image_size: int = 224
  num_classes: int = 102  # Flowers-102, the paper's Tables 3-5

  def model_kwargs(self) -> dict:
    name, _, ratio = self.method.partition("@")
    variant, batch_norm = name, "fixed"
    for suffix, mode in ((BN_FROZEN_SUFFIX, "frozen"), (BN_TRAIN_SUFFIX, "train")):
      if name.endswith(suffix):
        variant, batch_norm = name[:-len(suffix)], mode
        break
    if variant in RAZOR_VARIANTS and ratio:
      return dict(policy=Policy(float(ratio), **RAZOR_VARIANTS[variant]),
                  batch_norm=batch_norm)
    if name == "full":
      return dict(prune_ratio=0.0, batch_norm="train")
    if name == "full_bnfixed":  # razor's control: exact gradients, BatchNorm fixed
      return dict(prune_ratio=0.0, batch_norm="fixed")
    if name == "full_bnfrozen":  # razor_bnfrozen's control
      return dict(prune_ratio=0.0, batch_norm="frozen")
    if name == "actnn":
      return dict(compression="actnn", batch_norm="train")
    if name == "actnn_bnfixed":  # at batch 1, where batch statistics are degenerate
      return dict(compression="actnn", batch_norm="fixed")
    if name == "tinytl_b":
      return dict(finetune="biases")
    if name == "tinytl_lb":
      return dict(finetune="lite_residual+biases")
    raise ValueError(f"unknown CNN method {self.method!r}; expected one of"
                     f" {', '.join(v + '@R' for v in RAZOR_VARIANTS)} (R the prune ratio;"
                     f" {BN_TRAIN_SUFFIX!r} after the name trains BatchNorm,"
                     f" {BN_FROZEN_SUFFIX!r} trains its scale and bias on running statistics) or"
                     f" one of {BASE_METHODS}")

  def model(self) -> mobilenet.CNN:
    return mobilenet.CNN(arch=self.arch, num_classes=self.num_classes, **self.model_kwargs())

  @property
  def image(self):
    return jax.ShapeDtypeStruct((self.batch, self.image_size, self.image_size, 3), jnp.float32)


def abstract_variables(case: CnnCase):
  return jax.eval_shape(lambda: case.model().init(
      jax.random.key(0), jnp.zeros((1, case.image_size, case.image_size, 3))))


def _loss(case: CnnCase, batch_stats):
  model = case.model()
  # Concrete (and small: a few hundred KB): the running averages are read, not trained.
  batch_stats = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), batch_stats)

  def loss(params, images, labels):
    logits, _ = model.apply({"params": params, "batch_stats": batch_stats}, images, train=True,
                            mutable=["batch_stats"])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))
  return loss


def saved_activation_bytes(case: CnnCase) -> int:
  """Bytes the backward keeps of one step's activations (params excluded); traced only."""
  variables = abstract_variables(case)
  labels = jax.ShapeDtypeStruct((case.batch,), jnp.int32)
  residuals = ad_checkpoint.saved_residuals(_loss(case, variables["batch_stats"]),
                                            variables["params"], case.image, labels)
  # A frozen param reaches the backward through stop_gradient (TinyTL's kernels): still
  # a param, not an activation.
  param_shapes = {tuple(a.shape) for a in jax.tree.leaves(variables["params"])}
  total = 0
  for aval, source in residuals:
    # Parameters are not activations; the image is (the stem conv keeps it).
    if source.startswith("from the argument params") or (
        "stop_gradient" in source and tuple(aval.shape) in param_shapes):
      continue
    total += math.prod(aval.shape) * jnp.dtype(aval.dtype).itemsize
  return total


def trainable_mask(case: CnnCase, params) -> dict:
  """{path: bool} of the params the method trains: the model's own rule (CNN.trainable)."""
  return traverse_util.flatten_dict(case.model().trainable(params))


def paper_total_bytes(case: CnnCase, activation_bytes: int) -> int:
  """TinyTL's `profile_memory_cost`: activations + trainable params x 4 + frozen x 1 bytes."""
  params = abstract_variables(case)["params"]
  mask = trainable_mask(case, params)
  flat = traverse_util.flatten_dict(params)
  param_bytes = sum(math.prod(a.shape) * (4 if mask[p] else 1) for p, a in flat.items())
  return activation_bytes + param_bytes


def train_step(case: CnnCase, lr: float = 0.01):
  """One SGD step on the trained params (frozen ones pass through), params donated."""
  variables = abstract_variables(case)
  loss = _loss(case, variables["batch_stats"])
  mask = traverse_util.unflatten_dict(trainable_mask(case, variables["params"]))

  def step(params, images, labels):
    grads = jax.grad(loss)(params, images, labels)
    return jax.tree.map(lambda p, g, m: p - lr * g if m else p, params, grads, mask)
  return jax.jit(step, donate_argnums=0), variables


def compiled_peak_bytes(case: CnnCase, device=None) -> Optional[int]:
  """XLA's argument + output + temp - alias bytes of the donated train step (compiles).

  `device`: compile for it (e.g. a compile-only GPU of `gpu_aot`), not the default one.
  """
  step, variables = train_step(case)
  args = (variables["params"], case.image, jax.ShapeDtypeStruct((case.batch,), jnp.int32))
  if device is not None:
    sharding = jax.sharding.SingleDeviceSharding(device)
    args = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        args)
  try:
    return memory.compiled_memory(step, *args).peak_bytes
  except RuntimeError:
    return None


def gpu_compiled_peaks(cases, target: str = "h200", timeout_s: float = 3600) -> dict:
  """{case: compiled peak bytes} of `cases` compiled for `target` (benchmarks.gpu_aot's
  deviceless AOT, in a child process)."""
  import json  # pylint: disable=g-import-not-at-top
  from benchmarks import gpu_aot  # pylint: disable=g-import-not-at-top
  gpu_aot.target_description(target)  # an unknown target fails here, not in the child
  payload = json.dumps([dataclasses.asdict(c) for c in cases])
  results = gpu_aot.child_results(["benchmarks.cnn", target, payload],
                                  f"CNN cases {payload} for {target}", timeout_s=timeout_s)
  return {CnnCase(**r["case"]): r["compiled_peak_bytes"] for r in results}


def _aot_child(target: str, payload: str):
  import json  # pylint: disable=g-import-not-at-top
  from benchmarks import gpu_aot  # pylint: disable=g-import-not-at-top
  device = gpu_aot.topology_mesh(target).devices.flat[0]
  for fields in json.loads(payload):
    peak = compiled_peak_bytes(CnnCase(**fields), device)
    print(gpu_aot.RESULT_PREFIX + json.dumps({"case": fields, "compiled_peak_bytes": peak}),
          flush=True)
    jax.clear_caches()


if __name__ == "__main__":
  import sys  # pylint: disable=g-import-not-at-top
  _aot_child(*sys.argv[1:3])
