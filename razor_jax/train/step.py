"""The pure pieces of training: TrainState, the optimizer, train_step and eval_step.

Nothing here knows about devices or files; razor_jax.train.setup jits these with shardings.
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import struct

from razor_jax.train import config as train_config


@struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: updates applied so far
  params: Any
  opt_state: Any
  # A CNN's BatchNorm running averages (the model's `batch_stats` collection); empty for
  # models without one (the ViT), whose checkpoints then keep their old layout.
  batch_stats: Any = struct.field(default_factory=dict)

  @property
  def variables(self) -> dict:
    """What model.apply takes: the params, and the batch statistics if there are any."""
    if self.batch_stats:
      return {"params": self.params, "batch_stats": self.batch_stats}
    return {"params": self.params}


def make_schedule(config) -> optax.Schedule:
  """Linear warm-up from 0 to config.lr, then cosine decay to 0 at config.total_steps."""
  warmup = min(config.warmup_steps, config.total_steps)
  # optax needs at least one decay step; a warm-up as long as the run never reaches it.
  return optax.warmup_cosine_decay_schedule(0.0, config.lr, warmup,
                                            max(config.total_steps, warmup + 1))


def make_optimizer(config) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """Gradient clipping, weight decay and the optimizer named by config.optimizer.name."""
  opt = config.optimizer
  if opt.name not in train_config.OPTIMIZERS:
    raise ValueError(f"optimizer.name must be one of {train_config.OPTIMIZERS}, got {opt.name!r}")
  schedule = make_schedule(config)
  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if opt.weight_decay > 0 and opt.name != "adamw":
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  if opt.name == "sgd":
    parts.append(optax.sgd(schedule, momentum=opt.momentum or None, nesterov=opt.nesterov))
  elif opt.name == "adam":
    parts.append(optax.adam(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps))
  else:
    parts.append(optax.adamw(schedule, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                             weight_decay=opt.weight_decay))
  return optax.chain(*parts), schedule


def cross_entropy(logits, labels, label_smoothing: float = 0.0):
  """Per-example softmax cross entropy against (optionally smoothed) one-hot labels."""
  targets = jax.nn.one_hot(labels, logits.shape[-1])
  if label_smoothing:
    targets = optax.smooth_labels(targets, label_smoothing)
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def _split_micro_batches(batch: dict, count: int, sharding) -> dict:
  """[B, ...] -> [count, B // count, ...], micro-batch i being rows i, i + count, ...

  Strided rather than contiguous micro-batches keep each one spread over all devices
  when the batch axis is split over them.
  """
  def split(x):
    x = x.reshape(x.shape[0] // count, count, *x.shape[1:]).swapaxes(0, 1)
    if sharding is not None:
      x = jax.lax.with_sharding_constraint(x, sharding)
    return x
  return jax.tree.map(split, batch)


def _global_norm(tree) -> jax.Array:
  # Written out: optax renamed its helper (global_norm -> tree.norm) across the versions
  # that requirements.txt allows.
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in jax.tree.leaves(tree)))


def make_train_step(model: nn.Module, tx: optax.GradientTransformation,
                    schedule: optax.Schedule, *, label_smoothing: float = 0.0,
                    grad_accum_steps: int = 1,
                    micro_batch_sharding: Optional[jax.sharding.Sharding] = None) -> Callable:
  """train_step(state, batch, rng) -> (state, metrics) for a classifier `model`.

  The loss is the mean over the examples whose mask is 1, over the whole batch even with
  gradient accumulation (sums are accumulated, then divided once). `rng` is the run's
  dropout key; each step folds in its step number, so a resumed run draws the same keys.
  `micro_batch_sharding` lays out the [micro-batches, B/n, ...] split (batch on axis 1).
  A state with batch_stats (a CNN) gets them back as the model's train-mode BatchNorms
  left them (unchanged where BatchNorm is frozen); micro-batches update them in turn.
  """

  def sums(params, batch_stats, batch, rng):
    variables = {"params": params}
    if batch_stats:
      variables["batch_stats"] = batch_stats
      logits, updated = model.apply(variables, batch["image"], train=True,
                                    rngs={"dropout": rng}, mutable=["batch_stats"])
      batch_stats = updated["batch_stats"]
    else:
      logits = model.apply(variables, batch["image"], train=True, rngs={"dropout": rng})
    mask = batch["mask"].astype(jnp.float32)
    loss_sum = jnp.sum(cross_entropy(logits, batch["label"], label_smoothing) * mask)
    correct = jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask)
    return loss_sum, (correct, jnp.sum(mask), batch_stats)

  grad_sums = jax.value_and_grad(sums, has_aux=True)

  def train_step(state: TrainState, batch: dict, rng: jax.Array):
    rng = jax.random.fold_in(rng, state.step)
    if grad_accum_steps == 1:
      (loss_sum, (correct, count, batch_stats)), grads = grad_sums(
          state.params, state.batch_stats, batch, rng)
    else:
      micro = _split_micro_batches(batch, grad_accum_steps, micro_batch_sharding)

      def accumulate(carry, xs):
        totals, stats = carry
        index, micro_batch = xs
        (l, (c, n, stats)), g = grad_sums(state.params, stats, micro_batch,
                                          jax.random.fold_in(rng, index))
        return (jax.tree.map(jnp.add, totals, (l, c, n, g)), stats), None

      zeros = (jnp.zeros(()), jnp.zeros(()), jnp.zeros(()),
               jax.tree.map(jnp.zeros_like, state.params))
      ((loss_sum, correct, count, grads), batch_stats), _ = jax.lax.scan(
          accumulate, (zeros, state.batch_stats), (jnp.arange(grad_accum_steps), micro))
    count = jnp.maximum(count, 1.0)
    grads = jax.tree.map(lambda g: g / count, grads)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {"loss": loss_sum / count, "accuracy": correct / count,
               "grad_norm": _global_norm(grads), "lr": schedule(state.step)}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         batch_stats=batch_stats), metrics

  return train_step


def make_eval_step(model: nn.Module) -> Callable:
  """eval_step(variables, batch) -> sums of correct, counted and loss over unmasked examples.

  `variables` is TrainState.variables: the params, and a CNN's batch statistics, which
  evaluation only reads (BatchNorm on its running averages).
  """

  def eval_step(variables, batch):
    logits = model.apply(variables, batch["image"], train=False)
    mask = batch["mask"].astype(jnp.float32)
    return {"correct": jnp.sum((jnp.argmax(logits, -1) == batch["label"]) * mask),
            "count": jnp.sum(mask),
            "loss_sum": jnp.sum(cross_entropy(logits, batch["label"]) * mask)}

  return eval_step
