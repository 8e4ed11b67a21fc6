"""Vision Transformer with Back Razor, parameter-compatible with google-research/vision_transformer.

The architecture and parameter tree are those of vit_jax's linen `VisionTransformer`
(patch conv `embedding`, `cls`, `Transformer/posembed_input/pos_embedding`,
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, optional `pre_logits`,
`head`), so the public checkpoints load through `load_pretrained` and the forward
output matches the reference at any prune ratio.

Inside each encoder block every activation the backward needs is stored pruned:
LayerNorm inputs and the projections they feed share one packed copy (see `block_ops`),
then q and k, the attention probabilities and v, the out-projection input, and the fc2
input; GELU keeps a 2-bit code of its derivative. The patch embedding (a plain nn.Conv) and the
head stay exact, as in the paper. The knob is the layers' (`razor_jax.policy`):
`prune_ratio` (default 0.8, `Policy()`) or a `policy`; with nothing pruned (`prune_ratio=0.0`,
`Policy(0.0)`) the model is plain autodiff: full fine-tuning.

Blocks are scanned by default: their params are stacked under `encoderblock` (made
by nn.scan at init), and the forward and backward run them through
`razor_jax.scan.scan_layers`, a custom-VJP scan over batch slices (with
`remat=True`, for comparison, through nn.scan). XLA then keeps one
block's dense activations at a time and the packed residuals of all blocks, which is
where the saving becomes real (see README, "What makes the saving real").
`scan=False` unrolls them under the names `encoderblock_{i}`; `load_pretrained` and
`export` handle both layouts.
"""
from __future__ import annotations

import math
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from razor_jax import block_ops, ops, scan
from razor_jax import policy as policy_lib
from razor_jax.models.vit_checkpoint import (  # noqa: F401  (public API of this module)
    CheckpointMismatchError, export, load_pretrained)
from razor_jax.policy import Policy, resolve

# name -> (patch_size, hidden_size, mlp_dim, num_heads, num_layers)
VARIANTS = {
    "Ti/16": (16, 192, 768, 3, 12),
    "S/16": (16, 384, 1536, 6, 12),
    "B/16": (16, 768, 3072, 12, 12),
    "B/32": (32, 768, 3072, 12, 12),
    "L/16": (16, 1024, 4096, 16, 24),
    "L/32": (32, 1024, 4096, 16, 24),
    "H/14": (14, 1280, 5120, 16, 32),
}
CLASSIFIERS = ("token", "gap")
_xavier = nn.initializers.xavier_uniform()


def _flat_init(init, n_in: int):
  """flax DenseGeneral's init: `init` on the (prod(in), prod(out)) matrix, then reshaped."""
  def wrapped(rng, shape, dtype=jnp.float32):
    flat = (math.prod(shape[:n_in]), math.prod(shape[n_in:]))
    return jnp.reshape(init(rng, flat, dtype), shape)
  return wrapped


class _LayerNormParams(nn.Module):
  """The params of an nn.LayerNorm (scale, bias) without its computation."""

  @nn.compact
  def __call__(self, features: int):
    return (self.param("scale", nn.initializers.ones, (features,)),
            self.param("bias", nn.initializers.zeros, (features,)))


class _DenseParams(nn.Module):
  """The params of an nn.DenseGeneral contracting `in_shape` into `features`."""
  in_shape: tuple
  features: tuple
  kernel_init: Any = _xavier
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self):
    kernel = self.param("kernel", _flat_init(self.kernel_init, len(self.in_shape)),
                        self.in_shape + self.features)
    bias = self.param("bias", _flat_init(self.bias_init, 0), self.features)
    return kernel, bias


class _AttentionParams(nn.Module):
  """The params of nn.MultiHeadDotProductAttention(num_heads, xavier kernels)."""
  num_heads: int

  @nn.compact
  def __call__(self, d: int):
    heads = (self.num_heads, d // self.num_heads)
    qkv = [_DenseParams((d,), heads, name=n)() for n in ("query", "key", "value")]
    return qkv, _DenseParams(heads, (d,), name="out")()


class _MlpParams(nn.Module):
  """The params of vit_jax's MlpBlock (Dense_0, Dense_1; xavier kernels, tiny normal biases)."""
  mlp_dim: int

  @nn.compact
  def __call__(self, d: int):
    dense = lambda i, o, name: _DenseParams(
        (i,), (o,), bias_init=nn.initializers.normal(stddev=1e-6), name=name)()
    return dense(d, self.mlp_dim, "Dense_0"), dense(self.mlp_dim, d, "Dense_1")


def _cast(dtype, *arrays):
  return [None if a is None else jnp.asarray(a, dtype) for a in arrays]


def _ln_then_project(policy: Policy, x, ln, kernels, biases, dtype):
  """LayerNorm then projections; one packed copy when both are pruned (block_ops).

  Only x is cast here: the ops cast the params to x's dtype inside their custom VJPs,
  so that a bfloat16 model's residuals do not hold a cast copy of every layer's params.
  """
  (x,) = _cast(dtype, x)
  scale, bias = ln
  ln_spec, dense_spec = policy.spec("layer_norm"), policy.spec("dense")
  if ln_spec is not None and dense_spec is not None and policy.layer_norm_mode == "fused":
    shared = ln_spec if ln_spec.prune_ratio <= dense_spec.prune_ratio else dense_spec
    return block_ops.layer_norm_dense_multi(x, scale, bias, kernels, biases, shared)
  y = ops.layer_norm(x, *_cast(dtype, scale, bias), ln_spec)
  return ops.dense_multi(y, kernels, biases, dense_spec)


class Encoder1DBlock(nn.Module):
  """Pre-norm transformer block (vit_jax's Encoder1DBlock) with razor ops.

  Called as block(x, deterministic) -> (x, None), the signature nn.scan expects (it
  stacks the blocks' params at init).
  """
  mlp_dim: int
  num_heads: int
  policy: Policy
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, deterministic: bool):
    assert x.ndim == 3, f"expected (batch, tokens, hidden), got {x.shape}"
    d, dtype, policy = x.shape[-1], self.dtype, self.policy
    if d % self.num_heads:
      raise ValueError(f"hidden_size {d} is not divisible by num_heads {self.num_heads}")
    dropout = lambda y: nn.Dropout(rate=self.dropout_rate)(y, deterministic=deterministic)
    dense_spec, attn_spec = policy.spec("dense"), policy.spec("attention")

    ln0 = _LayerNormParams(name="LayerNorm_0")(d)
    qkv, (out_k, out_b) = _AttentionParams(self.num_heads,
                                           name="MultiHeadDotProductAttention_0")(d)
    ln1 = _LayerNormParams(name="LayerNorm_1")(d)
    (k1, b1), (k2, b2) = _MlpParams(self.mlp_dim, name="MlpBlock_0")(d)

    # Attention, as flax's MultiHeadDotProductAttention computes it.
    q, k, v = _ln_then_project(policy, x, ln0, [p[0] for p in qkv], [p[1] for p in qkv],
                               dtype)
    q = q / jnp.sqrt(q.shape[-1]).astype(dtype)
    logits = ops.attention_logits(q, k, attn_spec)
    y = ops.softmax_attend(logits, v, attn_spec, p_spec=policy.spec("softmax"))
    y = ops.dense_general(y, out_k, out_b, dense_spec, axis=(-2, -1))
    x = dropout(y) + x

    # MLP: LayerNorm, fc1, gelu (tanh form, flax's default), fc2.
    (h,) = _ln_then_project(policy, x, ln1, [k1], [b1], dtype)
    h = dropout(ops.gelu(h, approximate=True, storage=policy.gelu))
    y = dropout(ops.dense(h, k2, b2, dense_spec))
    return x + y, None


class _PosEmbed(nn.Module):

  @nn.compact
  def __call__(self, x):
    return self.param("pos_embedding", nn.initializers.normal(stddev=0.02),
                      (1,) + x.shape[1:])


class Encoder(nn.Module):
  """Position embedding, the blocks (scanned or unrolled) and the final LayerNorm.

  Returns the normalized cls token (classifier "token") or all normalized tokens.
  """
  num_layers: int
  mlp_dim: int
  num_heads: int
  policy: Policy
  classifier: str = "token"
  dropout_rate: float = 0.0
  scan: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  batch_chunk: Optional[int] = 0

  @nn.compact
  def __call__(self, x, *, train: bool):
    assert x.ndim == 3, f"expected (batch, tokens, hidden), got {x.shape}"
    x = x + _PosEmbed(name="posembed_input")(x)
    x = nn.Dropout(rate=self.dropout_rate)(x, deterministic=not train)
    x = x.astype(self.dtype)
    block = Encoder1DBlock
    if self.remat:
      block = nn.remat(block, prevent_cse=not self.scan, static_argnums=(2,))
    kwargs = dict(mlp_dim=self.mlp_dim, num_heads=self.num_heads, policy=self.policy,
                  dropout_rate=self.dropout_rate, dtype=self.dtype)
    if self.scan and not self.remat and not self.is_initializing():
      x = self._scan_blocks(x, train, kwargs)
    elif self.scan:
      blocks = nn.scan(block, variable_axes={"params": 0},
                       split_rngs={"params": True, "dropout": True},
                       in_axes=nn.broadcast, length=self.num_layers)
      x, _ = blocks(name="encoderblock", **kwargs)(x, not train)
    else:
      for i in range(self.num_layers):
        x, _ = block(name=f"encoderblock_{i}", **kwargs)(x, not train)

    scale, bias = _LayerNormParams(name="encoder_norm")(x.shape[-1])
    if self.classifier == "token":
      # LayerNorm is per token: normalizing only the cls token gives the same output
      # as normalizing every token and then selecting it, without storing the sequence.
      return ops.layer_norm(x[:, 0], scale, bias, None)
    # The original keeps the encoder norm exact (its "separate" mode is the paper preset's).
    spec = None if self.policy.layer_norm_mode == "separate" else self.policy.spec("layer_norm")
    return ops.layer_norm(x, scale, bias, spec)


  def _scan_blocks(self, x, train: bool, kwargs):
    """The blocks through razor_jax.scan.scan_layers (see there for why not nn.scan)."""
    stacked = self.variables["params"]["encoderblock"]
    block = Encoder1DBlock(parent=None, **kwargs)
    keys, typed = None, False
    if train and self.dropout_rate > 0.0:
      keys = jax.random.split(self.make_rng("dropout"), self.num_layers)
      # Raw uint32 key data crosses the custom VJP; typed keys are rewrapped per layer.
      typed = jnp.issubdtype(keys.dtype, jax.dtypes.prng_key)
      keys = jax.random.key_data(keys) if typed else keys

    def run(params, y, key):
      rngs = None
      if keys is not None:
        rngs = {"dropout": jax.random.wrap_key_data(key) if typed else key}
      return block.apply({"params": params}, y, not train, rngs=rngs)[0]

    chunk = policy_lib.auto_batch_chunk() if self.batch_chunk is None else self.batch_chunk
    if not self.policy.prunes:
      chunk = 0  # full fine-tuning stores every activation anyway; slices only add launches
    batch = x.shape[0]

    def layer(params, y, key):
      if not chunk or batch <= chunk or batch % chunk:
        return run(params, y, key)
      # Samples are independent inside a block: running it over slices of the batch
      # gives the same result while one block's dense temporaries shrink to a slice.
      ys = y.reshape((batch // chunk, chunk) + y.shape[1:])
      idx = jnp.arange(batch // chunk)
      out = lax.map(lambda a: run(params, a[0], key if keys is None
                                  else jax.random.fold_in(key, a[1])), (ys, idx))
      return out.reshape(y.shape)

    return scan.scan_layers(layer, stacked, x, keys)


class ViT(nn.Module):
  """Vision Transformer (vit_jax's linen VisionTransformer) trained with Back Razor.

  Attributes:
    num_classes: size of the classification head.
    variant: "Ti/16", "S/16", "B/16", "B/32", "L/16", "L/32" or "H/14"; fills the
      sizes below (which are ignored then). None: use the sizes as given.
    representation_size: width of the tanh `pre_logits` layer, or None for none.
    classifier: "token" (the cls token) or "gap" (mean over tokens).
    prune_ratio: Back Razor's ratio for every saved activation, in [0, 1); None (the
      default): 0.8, or the policy's. 0 = full fine-tuning.
    policy: a razor_jax.Policy instead of a prune_ratio (per-op-type ratios,
      granularity "sample" or "token", storage formats, GELU's storage).
    scan: run the blocks through razor_jax.scan.scan_layers (params stacked under
      `encoderblock`; with remat, through nn.scan); False unrolls them.
    remat: wrap each block in nn.remat (jax.checkpoint), for comparison.
    dtype: computation dtype of the encoder (params stay float32).
    batch_chunk: with scanned, pruned blocks, run each block over slices of this many
      samples (0: the whole batch). Samples are independent in a block, so the result
      is the same; one block's dense temporaries shrink to a slice. None: 32 on CPU, 0
      elsewhere (`policy.auto_batch_chunk`). Full fine-tuning runs unsliced.
  """
  num_classes: int
  variant: Optional[str] = None
  patch_size: int = 16
  hidden_size: int = 768
  mlp_dim: int = 3072
  num_heads: int = 12
  num_layers: int = 12
  representation_size: Optional[int] = None
  classifier: str = "token"
  dropout_rate: float = 0.0
  prune_ratio: Optional[float] = None
  policy: Optional[Policy] = None
  scan: bool = True
  remat: bool = False
  dtype: Any = jnp.float32
  batch_chunk: Optional[int] = None

  def __post_init__(self):
    if self.variant is not None and self.variant not in VARIANTS:
      raise ValueError(f"unknown ViT variant {self.variant!r}; expected one of"
                       f" {sorted(VARIANTS)} or None with explicit sizes")
    if self.classifier not in CLASSIFIERS:
      raise ValueError(f"classifier must be one of {CLASSIFIERS}, got {self.classifier!r}")
    self.razor_policy  # pylint: disable=pointless-statement  (validates the knob now)
    super().__post_init__()

  @property
  def sizes(self) -> tuple:
    """(patch_size, hidden_size, mlp_dim, num_heads, num_layers)."""
    if self.variant is not None:
      return VARIANTS[self.variant]
    return (self.patch_size, self.hidden_size, self.mlp_dim, self.num_heads, self.num_layers)

  @property
  def razor_policy(self) -> Policy:
    """The Policy the encoder runs with."""
    return resolve(self.prune_ratio, self.policy)

  @nn.compact
  def __call__(self, images, *, train: bool = False):
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"expected images of shape (batch, height, width, 3), got {images.shape}")
    patch, hidden, mlp_dim, heads, layers = self.sizes
    if images.shape[1] % patch or images.shape[2] % patch:
      raise ValueError(f"image size {images.shape[1:3]} is not a multiple of the patch size"
                       f" {patch}")
    x = nn.Conv(hidden, (patch, patch), strides=(patch, patch), padding="VALID",
                name="embedding")(images)
    b, h, w, c = x.shape
    x = x.reshape(b, h * w, c)
    if self.classifier == "token":
      cls = self.param("cls", nn.initializers.zeros, (1, 1, c))
      x = jnp.concatenate([jnp.tile(cls, (b, 1, 1)).astype(x.dtype), x], axis=1)
    x = Encoder(layers, mlp_dim, heads, self.razor_policy, self.classifier, self.dropout_rate,
                self.scan, self.remat, self.dtype, self.batch_chunk,
                name="Transformer")(x, train=train)
    x = x.astype(jnp.float32)
    if self.classifier == "gap":
      x = jnp.mean(x, axis=1)
    if self.representation_size is not None:
      x = jnp.tanh(nn.Dense(self.representation_size, name="pre_logits")(x))
    return nn.Dense(self.num_classes, kernel_init=nn.initializers.zeros, name="head")(x)
