"""Custom-VJP ops that a CNN adds to `razor_jax.ops`: ReLU6 and BatchNorm.

Convolutions (depthwise and grouped included, through `feature_group_count`) and the
classifier are `ops.conv` and `ops.dense`: their input is stored pruned, as the original
repository's `SparseConv2d` / `LinearSparse` do. What a CNN adds:

  relu6        the backward only needs where 0 < x < 6: a 1-bit mask (the original's
               memory profiler counts every ReLU/ReLU6 at 1 bit per element).
  batch norm   "train" mode: batch statistics; the backward needs the normalized input,
               rebuilt from a pruned copy of x with the exact per-channel mean and
               1/std (as `ops.layer_norm` does for rows).
               "frozen" mode: running statistics, so the op is affine per channel and
               its input gradient needs nothing stored; only the scale's gradient needs
               x (pruned, or nothing at all when the scale is frozen, as in the paper's
               `full_noBN` runs and TinyTL).

Each op has a `*_reference` twin in plain jnp that gets the same gradients by autodiff.
Channels are the last axis (NHWC, flax's layout); statistics reduce over all others.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax import lax

from razor_jax import barriers, packed
from razor_jax.ops import (PackSpec, check_float, check_packable, is_exact, map_row_ndim,
                           one_bit_unit, with_value_of)

# ----------------------------------------------------------------- relu6


def _relu6_mask(x):
  return (x > 0) & (x < 6)


# Where the unit passes its gradient: jax.nn.relu6's derivative is 1 on (0, 6) only.
_relu6 = one_bit_unit(jax.nn.relu6, _relu6_mask)


def relu6(x, compact: bool = True):
  """jax.nn.relu6 whose residual is a 1-bit mask of 0 < x < 6 (the gradient is exact)."""
  check_float("x", x)
  return _relu6(x) if compact else jax.nn.relu6(x)


def relu6_reference(x, compact: bool = True):
  # jax.nn.relu6's own derivative is 1 on the open interval (0, 6), 0 elsewhere.
  return jax.nn.relu6(x)


# ----------------------------------------------------------------- batch norm: shared

def channel_axes(x) -> tuple[int, ...]:
  return tuple(range(jnp.ndim(x) - 1))


def batch_norm_stats(x):
  """Per-channel mean and (biased) variance over every axis but the last, in float32.

  flax.linen.BatchNorm's fast variance: E[x^2] - E[x]^2, clipped at zero.
  """
  x32 = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  axes = channel_axes(x)
  mean = x32.mean(axes)
  var = jnp.maximum(0.0, lax.square(x32).mean(axes) - lax.square(mean))
  return mean, var


def batch_norm_apply(x, mean, var, scale, bias, eps):
  """(x - mean) / sqrt(var + eps) * scale + bias in flax's operation order (bit-identical)."""
  y = x - mean
  mul = lax.rsqrt(var + eps)
  args = [x]
  if scale is not None:
    mul *= scale
    args.append(scale)
  y *= mul
  if bias is not None:
    y += bias
    args.append(bias)
  return jnp.asarray(y, jnp.result_type(*args))


def _param_grads(g32, x_hat, scale, bias, axes):
  dscale = None if scale is None else jnp.sum(g32 * x_hat, axis=axes).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(g32, axis=axes).astype(bias.dtype)
  return dscale, dbias


def _check_channels(x, **per_channel):
  c = jnp.shape(x)[-1]
  for name, a in per_channel.items():
    if a is not None and jnp.shape(a) != (c,):
      raise ValueError(f"{name} must have shape ({c},) (one value per channel of the last"
                       f" axis of x {jnp.shape(x)}), got {jnp.shape(a)}")


# ----------------------------------------------------------------- batch norm: train mode

@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def _bn_train(x, scale, bias, eps, spec):
  mean, var = batch_norm_stats(x)
  return batch_norm_apply(x, mean, var, scale, bias, eps), mean, var


def _bn_train_fwd(x, scale, bias, eps, spec):
  mean, var = batch_norm_stats(x)
  y = batch_norm_apply(x, mean, var, scale, bias, eps)
  x_packed = spec.pack(x, map_row_ndim(x.ndim))
  res = (x_packed, mean, lax.rsqrt(var + eps), scale, bias)
  return (barriers.depend(y, x_packed), mean, var), res


def _bn_train_bwd(eps, spec, res, cotangents):
  # The statistics are returned under stop_gradient (see batch_norm_train): their
  # cotangents are zero and ignored.
  g = cotangents[0]
  x_packed, mean, rstd, scale, bias = res
  axes = channel_axes(g)
  x_pruned = packed.unpack(x_packed, after=g).astype(jnp.float32)
  x_hat = (x_pruned - mean) * rstd
  g32 = g.astype(jnp.float32)
  u = g32 * scale.astype(jnp.float32) if scale is not None else g32
  # The batch-statistics Jacobian, rstd * (I - 11^T/m - x_hat x_hat^T/m) per channel,
  # at the pruned x_hat.
  dx = rstd * (u - u.mean(axes) - x_hat * (u * x_hat).mean(axes))
  dscale, dbias = _param_grads(g32, x_hat, scale, bias, axes)
  return dx.astype(x_packed.dtype), dscale, dbias


_bn_train.defvjp(_bn_train_fwd, _bn_train_bwd)


def batch_norm_train(x, scale, bias, spec: Optional[PackSpec], epsilon: float = 1e-5):
  """BatchNorm with batch statistics; x pruned for the backward.

  Args:
    x: (..., channels); statistics over every other axis.
    scale, bias: (channels,) or None.
    spec: how x is stored for the backward; None or prune_ratio 0 is plain autodiff.
  Returns:
    (y, mean, var): the output and the batch statistics (float32, biased variance, no
    gradient) for the running averages.
  """
  check_packable(spec, map_row_ndim(jnp.ndim(x)), x=x)
  _check_channels(x, scale=scale, bias=bias)
  if is_exact(spec):
    mean, var = batch_norm_stats(x)
    y = batch_norm_apply(x, mean, var, scale, bias, epsilon)
  else:
    y, mean, var = _bn_train(x, scale, bias, epsilon, spec)
  return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def batch_norm_train_reference(x, scale, bias, spec: Optional[PackSpec], epsilon: float = 1e-5):
  mean, var = batch_norm_stats(x)
  exact = batch_norm_apply(x, mean, var, scale, bias, epsilon)
  stats = (lax.stop_gradient(mean), lax.stop_gradient(var))
  if is_exact(spec):
    return (exact,) + stats
  axes = channel_axes(x)
  mean_sg, rstd = lax.stop_gradient(mean), lax.stop_gradient(lax.rsqrt(var + epsilon))
  x_pruned = spec.prune_reference(x, map_row_ndim(x.ndim)).astype(jnp.float32)
  x_hat = lax.stop_gradient((x_pruned - mean_sg) * rstd)
  x32 = x.astype(jnp.float32)
  # Linear in x with the (symmetric) batch-norm Jacobian at the pruned x_hat.
  y = rstd * (x32 - x32.mean(axes) - x_hat * (x_hat * x32).mean(axes))
  if scale is not None:
    scale_sg = lax.stop_gradient(scale)
    y = y * scale_sg + x_hat * (scale - scale_sg)
  if bias is not None:
    y = y + bias
  return (with_value_of(exact, y.astype(exact.dtype)),) + stats


# ----------------------------------------------------------------- batch norm: frozen mode

@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6, 7))
def _bn_frozen(x, mean, var, scale, bias, eps, spec, scale_grad):
  return batch_norm_apply(x, mean, var, scale, bias, eps)


def _bn_frozen_fwd(x, mean, var, scale, bias, eps, spec, scale_grad):
  y = batch_norm_apply(x, mean, var, scale, bias, eps)
  stored = None
  if scale is not None and scale_grad:
    stored = spec.pack(x, map_row_ndim(x.ndim)) if spec is not None else x
    y = barriers.depend(y, stored)
  return y, (stored, mean, var, scale, bias)


def _bn_frozen_bwd(eps, spec, scale_grad, res, g):
  stored, mean, var, scale, bias = res
  rstd = lax.rsqrt(var.astype(jnp.float32) + eps)
  g32 = g.astype(jnp.float32)
  mul = rstd * scale.astype(jnp.float32) if scale is not None else rstd
  dx = (g32 * mul).astype(g.dtype)
  axes = channel_axes(g)
  dbias = None if bias is None else jnp.sum(g32, axis=axes).astype(bias.dtype)
  dscale = None
  if scale is not None:
    if stored is None:
      dscale = jnp.zeros_like(scale)
    else:
      x = packed.unpack(stored, after=g) if spec is not None else stored
      x_hat = (x.astype(jnp.float32) - mean) * rstd
      dscale = jnp.sum(g32 * x_hat, axis=axes).astype(scale.dtype)
  return dx, jnp.zeros_like(mean), jnp.zeros_like(var), dscale, dbias


_bn_frozen.defvjp(_bn_frozen_fwd, _bn_frozen_bwd)


def batch_norm_frozen(x, mean, var, scale, bias, spec: Optional[PackSpec],
                      epsilon: float = 1e-5, scale_grad: bool = True):
  """BatchNorm with fixed (running) statistics: a per-channel affine map of x.

  The input gradient and the bias gradient need nothing stored. The scale's gradient
  needs x: a pruned copy under `spec`, the dense x with spec None, and nothing with
  `scale_grad=False` (the scale is frozen; its gradient is then returned as zeros).
  The statistics get zero gradients.
  """
  check_float("x", x)
  _check_channels(x, mean=mean, var=var, scale=scale, bias=bias)
  if spec is not None and spec.exact:
    spec = None
  if spec is not None:
    check_packable(spec, map_row_ndim(jnp.ndim(x)), x=x)
  mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
  return _bn_frozen(x, mean, var, scale, bias, epsilon, spec, scale_grad)


def batch_norm_frozen_reference(x, mean, var, scale, bias, spec: Optional[PackSpec],
                                epsilon: float = 1e-5, scale_grad: bool = True):
  mean, var = lax.stop_gradient(mean), lax.stop_gradient(var)
  exact = batch_norm_apply(x, mean, var, scale, bias, epsilon)
  if scale is None:
    return exact
  if not scale_grad:
    scale = lax.stop_gradient(scale)
  elif spec is not None and not spec.exact:
    rstd = lax.rsqrt(var + epsilon)
    x_pruned = spec.prune_reference(x, map_row_ndim(x.ndim)).astype(jnp.float32)
    x_hat = lax.stop_gradient((x_pruned - mean) * rstd)
    scale_sg = lax.stop_gradient(scale)
    # dx through the exact map (scale fixed), dscale through the pruned x_hat.
    y = batch_norm_apply(x, mean, var, scale_sg, bias, epsilon).astype(jnp.float32)
    y = y + x_hat * (scale - scale_sg)
    return with_value_of(exact, y.astype(exact.dtype))
  return batch_norm_apply(x, mean, var, scale, bias, epsilon)
