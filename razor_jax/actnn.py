"""ActNN-style activation compression, the peer Back Razor is measured against.

Follows ActNN (Chen et al., ICML 2021) at its published default: every activation a
layer saves for the backward is quantized to 2 bits per element in groups of 256
(per sample, flattened), each group with a float32 minimum and step, rounded
stochastically so the dequantized value is unbiased; ReLU/ReLU6 keep a 1-bit mask (as
ActNN does). 2 + 64 / 256 = 2.25 bits per element. The forward is exact; convs,
dense layers and train-mode BatchNorm get their gradients from the dequantized input.

Stochastic rounding needs noise; instead of threading a PRNG key through every layer,
the noise is a counter-based hash of each element's index and the bits of its group's
range, so it changes whenever the activations do (every step) and the ops stay pure.
Each op has a `*_reference` twin (plain jnp, the same quantizer, autodiff).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from razor_jax import barriers
from razor_jax.conv_ops import channel_axes, batch_norm_apply, batch_norm_stats
from razor_jax.ops import check_float, conv_plain, freeze_conv_kwargs, with_value_of

BITS = 2
GROUP_SIZE = 256


def _groups(x):
  """x as (groups, GROUP_SIZE) float32, each sample padded to whole groups."""
  flat = x.reshape(x.shape[0], -1).astype(jnp.float32)
  pad = (-flat.shape[1]) % GROUP_SIZE
  flat = jnp.pad(flat, ((0, 0), (0, pad)))
  return flat.reshape(-1, GROUP_SIZE)


def _noise(lo, step):
  """Uniform [0, 1) per element from a hash of its index and its group's range (lowbias32)."""
  seed = lax.bitcast_convert_type(lo, jnp.uint32) ^ lax.bitcast_convert_type(step, jnp.uint32)
  idx = jnp.arange(lo.shape[0] * GROUP_SIZE, dtype=jnp.uint32).reshape(-1, GROUP_SIZE)
  h = idx * jnp.uint32(0x9E3779B9) ^ seed
  h ^= h >> 16
  h *= jnp.uint32(0x7FEB352D)
  h ^= h >> 15
  h *= jnp.uint32(0x846CA68B)
  h ^= h >> 16
  return (h >> 8).astype(jnp.float32) * (1.0 / (1 << 24))


def _codes(x):
  """(codes in [0, 3] as float32, lo, step) of each group."""
  g = _groups(x)
  lo = g.min(axis=1, keepdims=True)
  step = (g.max(axis=1, keepdims=True) - lo) / ((1 << BITS) - 1)
  step = jnp.where(step > 0, step, 1.0)
  q = jnp.floor((g - lo) / step + _noise(lo, step))
  return jnp.clip(q, 0, (1 << BITS) - 1), lo, step


def dequantize_reference(x):
  """What the backward sees of x: each element rounded stochastically to 4 levels."""
  q, lo, step = _codes(x)
  flat = (q * step + lo).reshape(x.shape[0], -1)[:, :x.size // x.shape[0]]
  return flat.reshape(x.shape).astype(x.dtype)


def compress(x):
  """2-bit codes of x (4 to a byte) and the float32 minimum and step of each group."""
  q, lo, step = _codes(x)
  q = q.astype(jnp.uint8).reshape(-1, 4)
  packed = q[:, 0] | (q[:, 1] << 2) | (q[:, 2] << 4) | (q[:, 3] << 6)
  return packed, lo[:, 0], step[:, 0]


def decompress(stored, shape, dtype):
  packed, lo, step = stored
  shifts = jnp.arange(0, 8, 2, dtype=jnp.uint8)
  q = ((packed[:, None] >> shifts) & 3).astype(jnp.float32).reshape(-1, GROUP_SIZE)
  flat = (q * step[:, None] + lo[:, None]).reshape(shape[0], -1)
  n = 1
  for d in shape[1:]:
    n *= d
  return flat[:, :n].reshape(shape).astype(dtype)


def _store(x):
  return barriers.materialize(compress, x)


def _restore(stored, g, shape, dtype):
  return decompress(barriers.depend(stored, g), shape, dtype)


def _st(x):
  """Value of x, gradient through the dequantized copy (for the references)."""
  return dequantize_reference(lax.stop_gradient(x))


# ----------------------------------------------------------------- conv and dense

def _proto(x):
  """An empty array that carries x's shape and dtype into the backward."""
  return jnp.zeros((0,) + tuple(x.shape), x.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _conv(x, kernel, bias, conv_kwargs):
  return conv_plain(x, kernel, bias, conv_kwargs)


def _conv_fwd(x, kernel, bias, conv_kwargs):
  stored = _store(x)
  y = conv_plain(x, kernel, bias, conv_kwargs)
  return barriers.depend(y, stored), (stored, kernel, bias, _proto(x))


def _conv_bwd(conv_kwargs, res, g):
  stored, kernel, bias, proto = res
  x = _restore(stored, g, proto.shape[1:], proto.dtype)
  _, vjp = jax.vjp(lambda a, w, b: conv_plain(a, w, b, conv_kwargs), x, kernel, bias)
  return vjp(g)


_conv.defvjp(_conv_fwd, _conv_bwd)


def conv(x, kernel, bias, **conv_kwargs):
  """lax.conv_general_dilated (+ bias), the input kept in 2 bits for the backward."""
  check_float("x", x)
  return _conv(x, kernel, bias, freeze_conv_kwargs(conv_kwargs))


def conv_reference(x, kernel, bias, **conv_kwargs):
  frozen = freeze_conv_kwargs(conv_kwargs)
  exact = conv_plain(x, kernel, bias, frozen)
  x_st = _st(x) + (x - lax.stop_gradient(x))
  return with_value_of(exact, conv_plain(x_st, kernel, bias, frozen))


def dense(x, kernel, bias):
  """x @ kernel + bias (x: (batch, features)), x kept in 2 bits for the backward."""
  y = conv(x[:, None, None, :], kernel[None, None], bias, window_strides=(1, 1),
           padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y[:, 0, 0, :]


def dense_reference(x, kernel, bias):
  y = conv_reference(x[:, None, None, :], kernel[None, None], bias, window_strides=(1, 1),
                     padding="VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  return y[:, 0, 0, :]


# ----------------------------------------------------------------- batch norm, train mode

@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _bn(x, scale, bias, eps):
  mean, var = batch_norm_stats(x)
  return batch_norm_apply(x, mean, var, scale, bias, eps), mean, var


def _bn_fwd(x, scale, bias, eps):
  mean, var = batch_norm_stats(x)
  stored = _store(x)
  y = batch_norm_apply(x, mean, var, scale, bias, eps)
  res = (stored, mean, lax.rsqrt(var + eps), scale, bias, _proto(x))
  return (barriers.depend(y, stored), mean, var), res


def _bn_bwd(eps, res, cotangents):
  g = cotangents[0]
  stored, mean, rstd, scale, bias, proto = res
  x = _restore(stored, g, proto.shape[1:], jnp.float32)
  axes = channel_axes(g)
  x_hat = (x - mean) * rstd
  g32 = g.astype(jnp.float32)
  u = g32 * scale.astype(jnp.float32) if scale is not None else g32
  dx = rstd * (u - u.mean(axes) - x_hat * (u * x_hat).mean(axes))
  dscale = None if scale is None else jnp.sum(g32 * x_hat, axis=axes).astype(scale.dtype)
  dbias = None if bias is None else jnp.sum(g32, axis=axes).astype(bias.dtype)
  return dx.astype(proto.dtype), dscale, dbias


_bn.defvjp(_bn_fwd, _bn_bwd)


def batch_norm_train(x, scale, bias, epsilon: float = 1e-5):
  """conv_ops.batch_norm_train with the input kept in 2 bits; returns (y, mean, var)."""
  check_float("x", x)
  y, mean, var = _bn(x, scale, bias, epsilon)
  return y, lax.stop_gradient(mean), lax.stop_gradient(var)


def batch_norm_train_reference(x, scale, bias, epsilon: float = 1e-5):
  mean, var = batch_norm_stats(x)
  exact = batch_norm_apply(x, mean, var, scale, bias, epsilon)
  stats = (lax.stop_gradient(mean), lax.stop_gradient(var))
  axes = channel_axes(x)
  mean_sg, rstd = lax.stop_gradient(mean), lax.stop_gradient(lax.rsqrt(var + epsilon))
  x_hat = lax.stop_gradient((_st(x).astype(jnp.float32) - mean_sg) * rstd)
  x32 = x.astype(jnp.float32)
  y = rstd * (x32 - x32.mean(axes) - x_hat * (x_hat * x32).mean(axes))
  if scale is not None:
    scale_sg = lax.stop_gradient(scale)
    y = y * scale_sg + x_hat * (scale - scale_sg)
  if bias is not None:
    y = y + bias
  return (with_value_of(exact, y.astype(exact.dtype)),) + stats
