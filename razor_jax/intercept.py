"""razorize(): Back Razor for an unmodified flax.linen model, through method interception.

    with razorize(prune_ratio=0.9):   # or razorize(policy=Policy.make(0.9, attention=0.0))
      loss, grads = jax.value_and_grad(loss_fn)(params, batch)

Inside the block every call of nn.Dense, nn.DenseGeneral, nn.LayerNorm (last axis),
nn.Conv and nn.MultiHeadDotProductAttention (also nn.MultiHeadAttention and
nn.SelfAttention) runs the razor computation of `razor_jax.layers` with the
module's own fields and existing params: the forward is bit-identical, the weight
gradients come from pruned activations.

Left exact (flax's own code runs): subclasses that override `__call__`, modules
whose configuration has no razor version (see `layers.UnsupportedConfigError`),
modules the policy prunes nothing of, and calls made while the model is being
initialised, so `init` creates exactly flax's params. Explicit razor layers keep
their own prune_ratio/policy. Params are read with `module.param`, which returns
the existing (unboxed) value and never creates one outside `init`.

A replaced call does not reach method interceptors entered inside the razorize
block (interceptors run outermost first, and this one does not call the next).

Not seen: plain function calls. `jax.nn.gelu` in a model stays exact; a model
that wants GELU's compact 8-bit residual calls `razor_jax.ops.gelu` itself.

`jax.jit` caches a trace without knowing whether razorize was active, so enter
the block inside the jitted function (or jit a separate function for it):
a function traced outside the block keeps exact gradients when later called inside.
Entering the block outside any trace therefore warns (RazorizeOutsideJitWarning);
eager code without jit gets razor gradients there, and can silence it with
`warnings.simplefilter("ignore", razor_jax.intercept.RazorizeOutsideJitWarning)`.
"""
from __future__ import annotations

import threading
import warnings
from contextlib import contextmanager
from typing import Optional

import flax.linen as nn

from razor_jax import layers
from razor_jax.policy import Policy, resolve

# The flax __call__ functions that are replaced, by their unwrapped function (what an
# interceptor sees), with the flax class the module must have, and the razor version.
_RAZOR_CALLS = {
    nn.Dense.__call__.__wrapped__: (nn.Dense, layers.razor_dense),
    nn.DenseGeneral.__call__.__wrapped__: (nn.DenseGeneral, layers.razor_dense_general),
    nn.LayerNorm.__call__.__wrapped__: (nn.LayerNorm, layers.razor_layer_norm),
    nn.Conv.__call__.__wrapped__: (nn.Conv, layers.razor_conv),
    nn.MultiHeadDotProductAttention.__call__.__wrapped__:
        (nn.MultiHeadDotProductAttention, layers.razor_mha),
}

# flax subclasses whose own __call__ only forwards to the parent's.
_FORWARDING_SUBCLASSES = (nn.SelfAttention,)


class _Active(threading.local):
  """The razorize blocks entered on this thread, innermost last."""

  def __init__(self):
    self.stack = []


_ACTIVE = _Active()


def _razor_call(module, fun):
  """The razor replacement for `fun` called on `module`, or None to run flax's code."""
  entry = _RAZOR_CALLS.get(fun)
  if entry is None:
    return None
  flax_cls, razor_fn = entry
  cls = type(module)
  if not isinstance(module, flax_cls):
    return None  # e.g. ConvLocal shares nn.Conv's __call__
  if cls.__call__ is not flax_cls.__call__ and cls not in _FORWARDING_SUBCLASSES:
    return None  # a subclass with its own __call__ may mean something else
  return razor_fn


class _Interceptor:
  """A flax method interceptor that swaps supported __call__s for razor ones."""

  def __init__(self, policy: Policy):
    self.policy = policy

  def __call__(self, next_fun, args, kwargs, context):
    # Interceptors run outermost first; only the innermost razorize block decides, and
    # outer ones pass the call on so any interceptors in between still see it.
    if not _ACTIVE.stack or _ACTIVE.stack[-1] is not self:
      return next_fun(*args, **kwargs)
    module = context.module
    razor_fn = None
    if context.method_name == "__call__" and not module.is_initializing():
      razor_fn = _razor_call(module, getattr(context.orig_method, "func", None))
    if razor_fn is None or layers.runs_exact(self.policy, module):
      return next_fun(*args, **kwargs)
    try:
      return razor_fn(module, self.policy, *args, **kwargs)
    except layers.UnsupportedConfigError as e:
      if getattr(e, "module", None) is not module:
        raise
      # Raised before any param, submodule or rng of `module` was touched, so flax's
      # code can still run.
      return next_fun(*args, **kwargs)


class RazorizeOutsideJitWarning(UserWarning):
  """razorize() entered where no function is being traced: a cached jit trace ignores it."""


def _tracing() -> bool:
  """Whether a jax transformation (jit, grad, vmap, ...) is tracing the current code."""
  try:
    from jax._src import core  # pylint: disable=g-import-not-at-top
    return not core.trace_state_clean()
  except (ImportError, AttributeError):  # a jax without it: no warning rather than a wrong one
    return True


@contextmanager
def _razorized(policy: Policy):
  if not _tracing():
    # stacklevel 3: the `with` line, past contextmanager's __enter__.
    warnings.warn(
        "razorize() was entered outside a jitted function: a function that jax.jit already"
        " traced (outside the block) keeps its cached trace and computes exact gradients"
        " inside it. Enter `with razorize(...)` inside the function you jit.",
        RazorizeOutsideJitWarning, stacklevel=3)
  interceptor = _Interceptor(policy)
  _ACTIVE.stack.append(interceptor)
  try:
    with nn.intercept_methods(interceptor):
      yield policy
  finally:
    popped = _ACTIVE.stack.pop()
    assert popped is interceptor, "razorize blocks exited out of order"


def razorize(prune_ratio: Optional[float] = None, *, policy: Optional[Policy] = None):
  """A context manager under which flax layers compute Back Razor gradients.

  Takes the layers' knob: `razorize(0.9)`, `razorize(prune_ratio=0.9)` or
  `razorize(policy=Policy.make(0.9, attention=0.0))` (a Policy passed positionally
  also works).

  Args:
    prune_ratio: fraction of each activation pruned, in [0, 1); `Policy()` (0.8)
      when neither argument is given. 0 keeps every gradient exact (plain fine-tuning).
    policy: a `Policy` (per-op-type ratios, storage formats) instead of a ratio.
  Returns:
    A context manager; `with razorize(...) as policy:` gives the Policy in force.
    Blocks nest (the innermost wins) and exit cleanly on exceptions.
  Raises:
    ValueError: at the call, for a prune ratio outside [0, 1) or both arguments given.
  """
  if isinstance(prune_ratio, Policy) and policy is None:
    prune_ratio, policy = None, prune_ratio
  return _razorized(resolve(prune_ratio, policy))
