"""flax.linen layers whose weight gradients come from pruned activations (Back Razor).

Each layer subclasses its flax twin and keeps its fields, parameter names, shapes,
initialisation and call signature, so params made by the flax layer load unchanged
and the forward output is bit-identical. `RazorModule` adds the two fields they all
share, `prune_ratio` and `policy` (one of them at most; `Policy()`, 0.8, when neither is
given, see `razor_jax.policy`), and dispatches each call: where the policy prunes nothing
the layer has, it runs flax's own code.

flax names an unnamed submodule after its class, so a RazorDense in a compact
parent is "RazorDense_0" where nn.Dense was "Dense_0": pass `name=` to keep the
parent's param tree, or leave the model alone and use `razorize()`.

The module-level `razor_dense`, `razor_dense_general`, `razor_layer_norm`, `razor_conv`
and `razor_mha` functions take the module as their first argument and only read its
fields and call `m.param` / `m.sow` / `m.make_rng`, so `razorize()` runs them on
unmodified flax modules too. They raise `UnsupportedConfigError` before touching any
state when a configuration has no razor version.
"""
from __future__ import annotations

import functools
import math
import warnings
from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.core import meta
from flax.linen import attention as flax_attention
from flax.linen import dtypes as flax_dtypes
from flax.linen import linear as flax_linear
from jax import lax

from razor_jax import ops
from razor_jax.policy import Policy, resolve


class UnsupportedConfigError(ValueError):
  """A layer configuration that has no razor version (razorize() leaves it exact)."""


def _unsupported(m, what: str):
  err = UnsupportedConfigError(
      f"{type(m).__name__}: {what}; use the plain flax layer for this configuration")
  err.module = m  # razorize() falls back only for the module it is replacing
  raise err


def runs_exact(policy: Policy, module) -> bool:
  """Whether `policy` prunes nothing that `module` (a flax or razor layer) computes.

  Such a call runs flax's own code, so its results and gradients are flax's.
  """
  if isinstance(module, nn.MultiHeadDotProductAttention):
    op_types = ("dense", "attention", "softmax") + (("layer_norm",) if module.normalize_qk else ())
  elif isinstance(module, nn.LayerNorm):
    op_types = ("layer_norm",)
  elif isinstance(module, nn.Conv):
    op_types = ("conv",)
  else:
    op_types = ("dense",)
  return all(policy.spec(t) is None for t in op_types)


def _require_float(m, dtype, what: str = "the computation dtype"):
  if not jnp.issubdtype(dtype, jnp.floating):
    _unsupported(m, f"{what} must be floating-point, got {jnp.dtype(dtype).name}")


def _compute_dtype(m, *args):
  """The dtype flax's promote_dtype gives `args` and float params of m.param_dtype."""
  if m.dtype is not None:
    return jnp.dtype(m.dtype)
  dtype = jnp.result_type(*args, m.param_dtype)
  if not jnp.issubdtype(dtype, jnp.inexact):
    dtype = jnp.promote_types(jnp.float32, dtype)
  return dtype


def _as_tuple(x) -> tuple:
  return tuple(x) if isinstance(x, (tuple, list)) else (x,)


class RazorModule(nn.Module):
  """The fields and the dispatch every Razor* layer shares; a base, not a layer.

  Attributes:
    prune_ratio: fraction of each activation dropped from its stored copy, in [0, 1);
      0 = exact. None (the default): 0.8, or the policy's.
    policy: a Policy (per-op-type ratios, storage formats) instead of a prune_ratio.
  """
  prune_ratio: Optional[float] = None
  policy: Optional[Policy] = None

  def __post_init__(self):
    self.razor_policy  # pylint: disable=pointless-statement  (raises now, at construction)
    super().__post_init__()

  @property
  def razor_policy(self) -> Policy:
    """The Policy this layer runs with."""
    return resolve(self.prune_ratio, self.policy)

  def razor_or_flax(self, razor_fn, flax_call, *args, **kwargs):
    """razor_fn(self, policy, ...) where the policy prunes something here, else flax's code."""
    policy = self.razor_policy
    if runs_exact(policy, self):
      return flax_call(*args, **kwargs)
    return razor_fn(self, policy, *args, **kwargs)


# ----------------------------------------------------------------- dense

def razor_dense(m, policy: Policy, inputs):
  """nn.Dense.__call__ with ops.dense."""
  if m.dot_general is not None or m.dot_general_cls is not None:
    _unsupported(m, "a custom dot_general / dot_general_cls")
  _require_float(m, _compute_dtype(m, inputs))
  kernel = m.param("kernel", m.kernel_init, (jnp.shape(inputs)[-1], m.features), m.param_dtype)
  bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
  inputs, kernel, bias = m.promote_dtype(inputs, kernel, bias, dtype=m.dtype)
  return ops.dense(inputs, kernel, bias, policy.spec("dense"), precision=m.precision)


def _dense_general_axes(m, inputs):
  """(features, sorted non-negative axes) of a DenseGeneral, or raises if unsupported."""
  if m.dot_general is not None or m.dot_general_cls is not None:
    _unsupported(m, "a custom dot_general / dot_general_cls")
  if _as_tuple(m.batch_dims):
    _unsupported(m, f"batch_dims={m.batch_dims!r} (only batch_dims=() is supported)")
  _require_float(m, _compute_dtype(m, inputs))
  # Sorted non-negative axes, as flax.linen.DenseGeneral and ops.dense_general use them.
  return _as_tuple(m.features), ops.canonical_axes(m.axis, jnp.ndim(inputs))


def _dense_general_params(m, inputs, features, axis):
  """kernel and bias exactly as nn.DenseGeneral makes them (flattened init, then reshape)."""
  n_axis = len(axis)

  def reshaped_init(init, flat_shape):
    def wrapped(rng, shape, dtype=jnp.float32):
      value = init(rng, flat_shape(shape), dtype)
      if isinstance(value, meta.AxisMetadata):
        return meta.replace_boxed(value, jnp.reshape(value.unbox(), shape))
      return jnp.reshape(value, shape)
    return wrapped

  kernel_shape = tuple(inputs.shape[a] for a in axis) + features
  kernel = m.param(
      "kernel",
      reshaped_init(m.kernel_init,
                    lambda s: (int(math.prod(s[:n_axis])), int(math.prod(s[n_axis:])))),
      kernel_shape, m.param_dtype)
  bias = None
  if m.use_bias:
    bias = m.param("bias", reshaped_init(m.bias_init, lambda s: (int(math.prod(s)),)),
                   features, m.param_dtype)
  return kernel, bias


def razor_dense_general(m, policy: Policy, inputs):
  """nn.DenseGeneral.__call__ (batch_dims=()) with ops.dense_general."""
  features, axis = _dense_general_axes(m, inputs)
  kernel, bias = _dense_general_params(m, inputs, features, axis)
  inputs, kernel, bias = m.promote_dtype(inputs, kernel, bias, dtype=m.dtype)
  return ops.dense_general(inputs, kernel, bias, policy.spec("dense"), axis=axis,
                           precision=m.precision)


class RazorDense(RazorModule, nn.Dense):
  """nn.Dense whose kernel gradient is computed from a top-K pruned copy of the input."""

  @nn.compact
  def __call__(self, inputs):
    return self.razor_or_flax(razor_dense, super().__call__, inputs)


class RazorDenseGeneral(RazorModule, nn.DenseGeneral):
  """nn.DenseGeneral with a pruned residual; `batch_dims` must be empty."""

  @nn.compact
  def __call__(self, inputs):
    return self.razor_or_flax(razor_dense_general, super().__call__, inputs)


class _Projection(nn.DenseGeneral):
  """Makes nn.DenseGeneral's kernel and bias and returns them without computing.

  Lets attention project one input through several kernels with one packed residual
  (ops.dense_multi) while each kernel stays in its own flax-named submodule.
  """

  @nn.compact
  def __call__(self, inputs):
    features, axis = _dense_general_axes(self, inputs)
    return _dense_general_params(self, inputs, features, axis)


# ----------------------------------------------------------------- layer norm

def razor_layer_norm(m, policy: Policy, x, *, mask=None):
  """nn.LayerNorm.__call__ over the last axis with ops.layer_norm."""
  last = (jnp.ndim(x) - 1,)
  for name in ("reduction_axes", "feature_axes"):
    axes = tuple(sorted({a % jnp.ndim(x) for a in _as_tuple(getattr(m, name))}))
    if axes != last:
      _unsupported(m, f"{name}={getattr(m, name)!r} (only the last axis, -1, is supported)")
  if mask is not None:
    _unsupported(m, "a mask")
  if m.axis_name is not None or m.axis_index_groups is not None:
    _unsupported(m, "axis_name / axis_index_groups (cross-device statistics)")
  if not m.use_fast_variance:
    _unsupported(m, "use_fast_variance=False")
  if not m.force_float32_reductions:
    _unsupported(m, "force_float32_reductions=False")
  _require_float(m, jnp.result_type(x), "the input dtype")
  # flax takes statistics in promote(dtype or x.dtype, float32); ops.layer_norm in
  # promote(x.dtype, float32).
  stats_dtype = jnp.promote_types(jnp.result_type(x) if m.dtype is None else m.dtype,
                                  jnp.float32)
  if stats_dtype != jnp.promote_types(jnp.result_type(x), jnp.float32):
    _unsupported(m, f"statistics in {jnp.dtype(stats_dtype).name} (dtype={m.dtype})")

  n = x.shape[-1]
  # A list, as flax passes it, so shape-dependent initialisers see the same argument.
  scale = m.param("scale", m.scale_init, [n], m.param_dtype) if m.use_scale else None
  bias = m.param("bias", m.bias_init, [n], m.param_dtype) if m.use_bias else None
  out_dtype = flax_dtypes.canonicalize_dtype(x, scale, bias, dtype=m.dtype)
  natural = jnp.result_type(*(a for a in (x, scale, bias) if a is not None))
  if jnp.promote_types(natural, out_dtype) != natural:
    # ops.layer_norm returns the inputs' result type; widen x so that rounding to it
    # loses nothing before the cast to a wider `dtype` (flax casts the f32 result).
    x = x.astype(jnp.promote_types(x.dtype, out_dtype))
  y = ops.layer_norm(x, scale, bias, policy.spec("layer_norm"), epsilon=m.epsilon)
  return jnp.asarray(y, out_dtype)


class RazorLayerNorm(RazorModule, nn.LayerNorm):
  """nn.LayerNorm over the last axis; its input gradient uses a pruned copy of the input.

  Only reduction_axes=feature_axes=-1, no mask, no cross-device statistics and
  flax's defaults for use_fast_variance and force_float32_reductions are supported;
  anything else raises UnsupportedConfigError (a ValueError).
  """

  @nn.compact
  def __call__(self, x, *, mask=None):
    return self.razor_or_flax(razor_layer_norm, super().__call__, x, mask=mask)


# ----------------------------------------------------------------- conv

def _conv_dimension_numbers(ndim: int):
  # Channels-last input and output, HWIO kernel: the layout flax's Conv uses.
  lhs = (0, ndim - 1) + tuple(range(1, ndim - 1))
  rhs = (ndim - 1, ndim - 2) + tuple(range(ndim - 2))
  return lax.ConvDimensionNumbers(lhs, rhs, lhs)


def razor_conv(m, policy: Policy, inputs):
  """nn.Conv.__call__ (shared weights) with ops.conv."""
  if m.conv_general_dilated is not None or m.conv_general_dilated_cls is not None:
    _unsupported(m, "a custom conv_general_dilated / conv_general_dilated_cls")
  if not m.shared_weights:
    _unsupported(m, "unshared weights (ConvLocal)")
  _require_float(m, _compute_dtype(m, inputs))

  kernel_size = _as_tuple(m.kernel_size)

  def per_dim(v):
    v = 1 if v is None else v
    return (v,) * len(kernel_size) if isinstance(v, int) else tuple(v)

  # Fold every leading batch axis into one, as flax does (and add one if missing).
  n_batch = inputs.ndim - (len(kernel_size) + 1)
  batch_shape = inputs.shape[:n_batch]
  if n_batch != 1:
    inputs = jnp.reshape(inputs, (-1,) + inputs.shape[n_batch:])

  strides, input_dilation, kernel_dilation = (
      per_dim(m.strides), per_dim(m.input_dilation), per_dim(m.kernel_dilation))
  padding = flax_linear.canonicalize_padding(m.padding, len(kernel_size))
  if padding in ("CIRCULAR", "REFLECT"):
    dilated = [(k - 1) * d + 1 for k, d in zip(kernel_size, kernel_dilation)]
    pads = [(0, 0)] + [((k - 1) // 2, k // 2) for k in dilated] + [(0, 0)]
    inputs = jnp.pad(inputs, pads, mode={"CIRCULAR": "wrap", "REFLECT": "reflect"}[padding])
    padding = "VALID"
  elif padding == "CAUSAL":
    if len(kernel_size) != 1:
      raise ValueError("Causal padding is only implemented for 1D convolutions.")
    inputs = jnp.pad(inputs, [(0, 0), (kernel_dilation[0] * (kernel_size[0] - 1), 0), (0, 0)])
    padding = "VALID"

  in_features = jnp.shape(inputs)[-1]
  if in_features % m.feature_group_count:
    raise ValueError(f"{type(m).__name__}: input features ({in_features}) must be divisible"
                     f" by feature_group_count ({m.feature_group_count})")
  kernel_shape = kernel_size + (in_features // m.feature_group_count, m.features)
  if m.mask is not None and m.mask.shape != kernel_shape:
    raise ValueError("Mask needs to have the same shape as weights. "
                     f"Shapes are: {m.mask.shape}, {kernel_shape}")
  kernel = m.param("kernel", m.kernel_init, kernel_shape, m.param_dtype)
  if m.mask is not None:
    kernel *= m.mask
  bias = m.param("bias", m.bias_init, (m.features,), m.param_dtype) if m.use_bias else None
  inputs, kernel, bias = m.promote_dtype(inputs, kernel, bias, dtype=m.dtype)

  y = ops.conv(inputs, kernel, bias, policy.spec("conv"),
               window_strides=strides, padding=padding, lhs_dilation=input_dilation,
               rhs_dilation=kernel_dilation,
               dimension_numbers=_conv_dimension_numbers(inputs.ndim),
               feature_group_count=m.feature_group_count, precision=m.precision)
  if n_batch != 1:
    y = jnp.reshape(y, batch_shape + y.shape[1:])
  return y


class RazorConv(RazorModule, nn.Conv):
  """nn.Conv whose kernel gradient is computed from a pruned copy of the (padded) input.

  Supports nn.Conv's options (strides, every padding mode, input/kernel dilation,
  feature groups, mask, use_bias); a custom conv_general_dilated raises
  UnsupportedConfigError.
  """

  @nn.compact
  def __call__(self, inputs):
    return self.razor_or_flax(razor_conv, super().__call__, inputs)


# ----------------------------------------------------------------- attention

def _check_mha(m):
  if m.decode:
    _unsupported(m, "decode=True (autoregressive cache)")
  if m.attention_fn is not flax_attention.dot_product_attention:
    _unsupported(m, "a custom attention_fn (only nn.dot_product_attention)")
  custom = [name for name in ("qkv_dot_general", "out_dot_general", "qkv_dot_general_cls",
                              "out_dot_general_cls", "qk_attn_weights_einsum_cls",
                              "attn_weights_value_einsum_cls")
            if getattr(m, name) is not None]
  if custom:
    _unsupported(m, f"custom {', '.join(custom)}")


def _resolve_kv(inputs_q, inputs_k, inputs_v, inputs_kv):
  """inputs_k and inputs_v with the defaults, errors and warnings of flax's MHA."""
  if inputs_kv is not None:
    if inputs_k is not None or inputs_v is not None:
      raise ValueError("If either `inputs_k` or `inputs_v` is not None, `inputs_kv` must be"
                       " None. Pass `inputs_k` and `inputs_v` instead of `inputs_kv`.")
    warnings.warn("The inputs_kv arg will be deprecated soon. Use inputs_k and inputs_v"
                  " instead.", DeprecationWarning)
    return inputs_kv, inputs_kv
  if inputs_k is None:
    if inputs_v is not None:
      raise ValueError("`inputs_k` cannot be None if `inputs_v` is not None. To have both"
                       " be the same value, pass it as `inputs_k` and leave `inputs_v` None.")
    inputs_k = inputs_q
  if inputs_v is None:
    inputs_v = inputs_k
  elif inputs_v.shape[-1] == inputs_v.shape[-2]:
    warnings.warn(f"You are passing an array of shape {inputs_v.shape} to the `inputs_v`"
                  " arg, when you may have intended to pass it to the `mask` arg.",
                  DeprecationWarning)
  return inputs_k, inputs_v


def _project(m, spec, inputs, params):
  """q, k, v projections; inputs that are the same array share one packed residual."""
  promoted = [flax_dtypes.promote_dtype(x, k, b, dtype=m.dtype)
              for x, (k, b) in zip(inputs, params)]
  outs = [None] * len(inputs)
  done = set()
  for i, x in enumerate(inputs):
    if i in done:
      continue
    group = [j for j in range(i, len(inputs))
             if inputs[j] is x and promoted[j][0].dtype == promoted[i][0].dtype]
    done.update(group)
    ys = ops.dense_multi(promoted[i][0], [promoted[j][1] for j in group],
                         [promoted[j][2] for j in group], spec, axis=-1, precision=m.precision)
    for j, y in zip(group, ys):
      outs[j] = y
  return outs


def _attend(m, policy: Policy, query, key, value, mask, dropout_rng, deterministic,
            sow_weights):
  """flax's dot_product_attention with razor QK^T and softmax-V.

  With attention dropout active, softmax, dropout and the weights-V product run as
  plain (exact) jnp, because the razor op fuses softmax with the V product.
  """
  query, key, value = flax_dtypes.promote_dtype(query, key, value, dtype=m.dtype)
  dtype = query.dtype
  query = query / jnp.sqrt(query.shape[-1]).astype(dtype)
  spec = policy.spec("attention")
  logits = ops.attention_logits(query, key, spec, precision=m.precision)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(dtype).min)
  # flax keeps float32 weights here (it does not cast back), so weights @ v is float32.
  fp32 = m.force_fp32_for_softmax and dtype != jnp.float32
  dropout = not deterministic and m.dropout_rate > 0.0

  if sow_weights or dropout:
    weights = (jax.nn.softmax(logits.astype(jnp.float32)) if fp32
               else jax.nn.softmax(logits).astype(dtype))
    if sow_weights:
      m.sow("intermediates", "attention_weights", weights)
  if dropout:
    keep_prob = 1.0 - m.dropout_rate
    shape = ((1,) * (key.ndim - 2) + weights.shape[-2:] if m.broadcast_dropout
             else weights.shape)
    keep = jax.random.bernoulli(dropout_rng, keep_prob, shape)
    weights = weights * (keep.astype(dtype) / jnp.asarray(keep_prob, dtype=dtype))
    return jnp.einsum("...hqk,...khd->...qhd", weights, value, precision=m.precision,
                      _dot_general=lax.dot_general)
  return ops.softmax_attend(logits, value, spec, precision=m.precision, softmax_in_float32=fp32,
                            p_spec=policy.spec("softmax"))


def razor_mha(m, policy: Policy, inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None,
         mask=None, deterministic=None, dropout_rng=None, sow_weights=False):
  """nn.MultiHeadDotProductAttention.__call__ with razor projections and attention."""
  _check_mha(m)  # before any submodule exists, so a fallback can still run flax's code
  inputs_k, inputs_v = _resolve_kv(inputs_q, inputs_k, inputs_v, inputs_kv)
  for name, x in (("inputs_q", inputs_q), ("inputs_k", inputs_k), ("inputs_v", inputs_v)):
    _require_float(m, _compute_dtype(m, x), f"the {name} projection dtype")

  features = m.out_features or inputs_q.shape[-1]
  qkv_features = m.qkv_features or inputs_q.shape[-1]
  if qkv_features % m.num_heads:
    raise ValueError(f"Memory dimension ({qkv_features}) must be divisible by number of"
                     f" heads ({m.num_heads}).")
  head_dim = qkv_features // m.num_heads

  projection = functools.partial(
      _Projection, axis=-1, dtype=m.dtype, param_dtype=m.param_dtype,
      features=(m.num_heads, head_dim), kernel_init=m.kernel_init, bias_init=m.bias_init,
      use_bias=m.use_bias, precision=m.precision)
  inputs = (inputs_q, inputs_k, inputs_v)
  params = [projection(name=n)(x) for n, x in zip(("query", "key", "value"), inputs)]
  query, key, value = _project(m, policy.spec("dense"), inputs, params)

  if m.normalize_qk:
    # ViT-22B's QK normalisation, named and shaped as flax's.
    norm = functools.partial(RazorLayerNorm, use_bias=False, dtype=m.dtype,
                             param_dtype=m.param_dtype, policy=policy)
    query = norm(name="query_ln")(query)
    key = norm(name="key_ln")(key)

  if m.dropout_rate > 0.0:
    deterministic = nn.merge_param("deterministic", m.deterministic, deterministic)
    if not deterministic and dropout_rng is None:
      dropout_rng = m.make_rng("dropout")
  else:
    deterministic = True

  x = _attend(m, policy, query, key, value, mask, dropout_rng, deterministic, sow_weights)
  return RazorDenseGeneral(
      features=features, axis=(-2, -1), kernel_init=m.out_kernel_init or m.kernel_init,
      bias_init=m.out_bias_init or m.bias_init, use_bias=m.use_bias, dtype=m.dtype,
      param_dtype=m.param_dtype, precision=m.precision, policy=policy, name="out")(x)


class RazorMultiHeadDotProductAttention(RazorModule, nn.MultiHeadDotProductAttention):
  """nn.MultiHeadDotProductAttention with razor projections, QK^T and softmax-V.

  Same fields, params (query/key/value/out, optional query_ln/key_ln) and call as
  flax's. When the query, key and value inputs are one array (self-attention), the
  three projections share one packed copy of it. Projections and LayerNorms use the
  "dense"/"layer_norm" policy entries, QK^T and softmax-V the "attention" entry (the
  probabilities the "softmax" entry, which defaults to "attention").
  With attention dropout active, softmax, dropout and weights-V run exactly (plain
  jnp). decode=True, a custom attention_fn or custom dot_general/einsum factories
  raise UnsupportedConfigError (a ValueError).
  """

  @nn.compact
  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, inputs_kv=None, mask=None,
               deterministic=None, dropout_rng=None, sow_weights=False):
    """Applies multi-head dot-product attention (see nn.MultiHeadDotProductAttention)."""
    return self.razor_or_flax(razor_mha, super().__call__, inputs_q, inputs_k, inputs_v,
                              inputs_kv=inputs_kv, mask=mask, deterministic=deterministic,
                              dropout_rng=dropout_rng, sow_weights=sow_weights)
