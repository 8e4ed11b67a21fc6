"""MobileNetV2 and ProxylessNAS-Mobile with Back Razor, BatchNorm and ReLU6 (NHWC).

Both are stacks of inverted-residual blocks (1x1 expand, k x k depthwise, 1x1 project,
each followed by BatchNorm; ReLU6 after the first two), built here from one block list:

  MobileNetV2 (Sandler et al. 2018) at width multipliers 0.35-1.4, the channel rounding
    of Keras's `MobileNetV2` (whose ImageNet weights `load_keras_h5` reads), "SAME"
    padding as Keras. Width 1.0, 1000 classes: 3,504,872 parameters (BatchNorm scales
    and biases included, running statistics not), as Keras and torchvision report.
  ProxylessNAS-Mobile (Cai et al. 2019), the network TinyTL and Back Razor fine-tune:
    the released `proxyless_mobile` architecture (stem 32, 21 blocks of kernel 3-7 and
    expansion 3 or 6 after dropping its two zero blocks, head 1280), symmetric padding
    as the PyTorch release. 1000 classes: 4,080,512 parameters, the figure the
    pytorchcv model zoo (osmr/imgclsmob, `proxylessnas_mobile`) asserts for it.

Params are flat, one entry per layer in Keras's naming (`Conv1`, `bn_Conv1`,
`block_3_expand`, `block_3_expand_BN`, ..., `predictions`); BatchNorm running averages
live in the `batch_stats` collection (`mean`, `var`).

Training methods (fields):
  prune_ratio / policy  Back Razor, as the ViT's: every conv and the classifier keep a
    pruned copy of their input ("conv", "dense" ratios), train-mode BatchNorm too
    ("layer_norm" ratio, the normalization entry of the policy); ReLU6 keeps a 1-bit mask.
    Nothing pruned (prune_ratio=0) is plain autodiff: full fine-tuning.
  compression="actnn"  the ActNN-style peer: the same inputs kept in 2 bits
    (`razor_jax.actnn`), ReLU6 as a 1-bit mask.
  batch_norm  "train": batch statistics, running averages updated (pass
    mutable=["batch_stats"]); "frozen": running statistics, an affine map whose input
    and bias gradients need nothing stored (its scale's gradient needs x: pruned under
    Back Razor); "fixed": frozen, and its scale and bias get no gradient either, so
    nothing is stored (the paper's CNN runs freeze BatchNorm: `full_noBN`). With
    train=False BatchNorm always uses the running statistics.
  finetune  "all"; "biases" (TinyTL-B: only biases and the classifier get gradients,
    BatchNorm frozen; a frozen conv kernel needs no stored input); "lite_residual+biases"
    (TinyTL-L+B: also a lite residual branch per block, see `LiteResidual`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from razor_jax import actnn, conv_ops, ops
from razor_jax.policy import Policy, resolve

BATCH_NORM_MODES = ("train", "frozen", "fixed")
COMPRESSIONS = ("razor", "actnn")
FINETUNE = ("all", "biases", "lite_residual+biases")
# What value_format="auto" means on a CNN's image rows (see `MobileNet.razor_policy`).
CNN_AUTO_VALUE_FORMAT = "log4"
MOBILENET_V2_WIDTHS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)


@dataclasses.dataclass(frozen=True)
class Block:
  """One inverted-residual block."""
  expansion: int  # hidden channels = expansion * input channels; 1 = no expand conv
  features: int  # output channels
  kernel: int  # depthwise kernel side
  stride: int


def make_divisible(v: float, divisor: int = 8) -> int:
  """Channels rounded to a multiple of `divisor`, never 10% below v (Keras/TF rule)."""
  new_v = max(divisor, int(v + divisor / 2) // divisor * divisor)
  return new_v + divisor if new_v < 0.9 * v else new_v


def mobilenet_v2_blocks(width: float = 1.0) -> tuple[int, tuple[Block, ...], int]:
  """(stem channels, blocks, head channels) of MobileNetV2 at `width` (Keras's rounding)."""
  if not 0.0 < width <= 4.0:
    raise ValueError(f"width must be in (0, 4] (the public weights: {MOBILENET_V2_WIDTHS}),"
                     f" got {width}")
  settings = [(1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2), (6, 96, 3, 1),
              (6, 160, 3, 2), (6, 320, 1, 1)]  # (expansion, channels, repeats, stride)
  blocks = []
  for t, c, n, s in settings:
    for i in range(n):
      blocks.append(Block(t, make_divisible(int(c * width)), 3, s if i == 0 else 1))
  head = make_divisible(1280 * width) if width > 1.0 else 1280
  return make_divisible(32 * width), tuple(blocks), head


def proxyless_mobile_blocks() -> tuple[int, tuple[Block, ...], int]:
  """(stem, blocks, head) of ProxylessNAS-Mobile; its two zero (skipped) blocks left out."""
  b = Block
  blocks = (
      b(1, 16, 3, 1),
      b(3, 32, 5, 2), b(3, 32, 3, 1),  # + two zero blocks
      b(3, 40, 7, 2), b(3, 40, 3, 1), b(3, 40, 5, 1), b(3, 40, 5, 1),
      b(6, 80, 7, 2), b(3, 80, 5, 1), b(3, 80, 5, 1), b(3, 80, 5, 1),
      b(6, 96, 5, 1), b(3, 96, 5, 1), b(3, 96, 5, 1), b(3, 96, 5, 1),
      b(6, 192, 7, 2), b(6, 192, 7, 1), b(3, 192, 7, 1), b(3, 192, 7, 1),
      b(6, 320, 7, 1))
  return 32, blocks, 1280


def tiny_blocks() -> tuple[int, tuple[Block, ...], int]:
  """A 4-block inverted-residual CNN (about 30k parameters) for tests and the digits demo."""
  b = Block
  return 16, (b(1, 16, 3, 1), b(4, 24, 3, 2), b(4, 24, 3, 1), b(4, 32, 5, 2)), 128


def _pads(kernel: int, padding: str):
  return "SAME" if padding == "SAME" else [(kernel // 2, kernel // 2)] * 2


class CNN(nn.Module):
  """An inverted-residual CNN (MobileNetV2 or ProxylessNAS-Mobile); see the module doc."""
  arch: str = "mobilenet_v2"  # "mobilenet_v2", "proxyless_mobile" or "tiny"
  num_classes: int = 1000
  width: float = 1.0  # mobilenet_v2 only
  prune_ratio: Optional[float] = None  # Back Razor; None: 0.8, or the policy's
  policy: Optional[Policy] = None
  compression: str = "razor"  # "razor" or "actnn"
  batch_norm: str = "train"  # "train", "frozen" or "fixed"
  finetune: str = "all"  # "all", "biases" or "lite_residual+biases"
  bn_epsilon: float = 1e-3  # Keras's and the ProxylessNAS release's
  # Weight of the old running average: PyTorch's 0.1 update (Keras's 0.999 leaves a short
  # fine-tuning run evaluating with statistics still close to the initial ones).
  bn_momentum: float = 0.9
  dropout_rate: float = 0.0  # before the classifier
  dtype: Any = jnp.float32  # compute dtype; params stay float32

  def __post_init__(self):
    if self.arch not in ARCHS:
      raise ValueError(f"arch must be one of {tuple(ARCHS)}, got {self.arch!r}")
    for name, allowed in (("compression", COMPRESSIONS), ("batch_norm", BATCH_NORM_MODES),
                          ("finetune", FINETUNE)):
      if getattr(self, name) not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
    if self.compression == "actnn" and (self.prune_ratio is not None or self.policy is not None):
      raise ValueError("compression='actnn' quantizes instead of pruning; pass no prune_ratio"
                       " or policy with it")
    resolve(self.prune_ratio, self.policy)
    super().__post_init__()

  # ----------------------------------------------------------------- method

  @property
  def razor_policy(self) -> Policy:
    if self.compression == "actnn" or self.finetune != "all":
      return Policy(0.0)
    policy = resolve(self.prune_ratio, self.policy)
    # The CNNs were measured with 4-bit log values on every op (results/cnn_digits.md);
    # the ViT's 1-bit "sign" values (what "auto" gives dense and norm rows) were not.
    if policy.value_format == "auto" and policy.granularity == "token":
      policy = dataclasses.replace(policy, value_format=CNN_AUTO_VALUE_FORMAT)
    return policy

  @property
  def compact_relu(self) -> bool:
    # Every compressing method keeps ReLU6 as a 1-bit mask; full fine-tuning is plain autodiff.
    return self.compression == "actnn" or self.finetune != "all" or self.razor_policy.prunes

  @property
  def bn_mode(self) -> str:
    return "frozen" if self.finetune != "all" else self.batch_norm

  @property
  def padding(self) -> str:
    return ARCHS[self.arch][1]

  def trainable(self, params):
    """A tree of bools like `params`: False where this method freezes the param.

    A frozen param's gradient is zero (stop_gradient); an optimizer should also give it
    no update and no state (weight decay would still move it, Adam would keep moments).
    TinyTL: the classifier, the lite residual branches and BatchNorm biases train;
    batch_norm="fixed": everything but BatchNorm's scales and biases.
    """
    def rule(path, _):
      layer, leaf = path[0].key, path[-1].key
      bn = leaf in ("scale", "bias") and layer != "predictions"  # convs have no bias
      if layer == "predictions" or "lite_residual" in layer:
        return True
      if self.finetune != "all":
        return bn and leaf == "bias"
      return not (bn and self.batch_norm == "fixed")
    return jax.tree_util.tree_map_with_path(rule, params)

  def blocks(self):
    if self.arch == "mobilenet_v2":
      return mobilenet_v2_blocks(self.width)
    return tiny_blocks() if self.arch == "tiny" else proxyless_mobile_blocks()

  # ----------------------------------------------------------------- layers

  def _conv(self, name, x, features, kernel, stride, groups):
    shape = (kernel, kernel, x.shape[-1] // groups, features)
    w = self.param(name, _kernel_param, shape)["kernel"]
    w = w.astype(self.dtype)
    kwargs = dict(window_strides=(stride, stride), padding=_pads(kernel, self.padding),
                  dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    if self.finetune != "all":
      # A frozen kernel: autodiff keeps only the kernel for the input gradient.
      return lax.conv_general_dilated(x, lax.stop_gradient(w), **kwargs)
    if self.compression == "actnn":
      return actnn.conv(x, w, None, **kwargs)
    return ops.conv(x, w, None, self.razor_policy.spec("conv"), **kwargs)

  def _bn(self, name, x, train):
    c = x.shape[-1]
    p = self.param(name, _bn_param, c)
    stats = self.variable("batch_stats", name, lambda: {"mean": jnp.zeros(c, jnp.float32),
                                                        "var": jnp.ones(c, jnp.float32)})
    mode = self.bn_mode
    scale_trains = self.finetune == "all" and mode != "fixed"
    scale = p["scale"] if scale_trains else lax.stop_gradient(p["scale"])
    bias = p["bias"] if mode != "fixed" else lax.stop_gradient(p["bias"])
    if train and mode == "train":
      if self.compression == "actnn":
        y, mean, var = actnn.batch_norm_train(x, scale, bias, self.bn_epsilon)
      else:
        y, mean, var = conv_ops.batch_norm_train(x, scale, bias,
                                                 self.razor_policy.spec("layer_norm"),
                                                 self.bn_epsilon)
      if not self.is_initializing():
        m = self.bn_momentum
        stats.value = {"mean": m * stats.value["mean"] + (1 - m) * mean,
                       "var": m * stats.value["var"] + (1 - m) * var}
      return y.astype(self.dtype)
    mean, var = stats.value["mean"], stats.value["var"]
    if not scale_trains:
      # An affine map with a frozen scale: the backward needs nothing stored.
      y = conv_ops.batch_norm_frozen(x, mean, var, scale, bias, None, self.bn_epsilon,
                                     scale_grad=False)
    elif self.compression == "razor" and self.razor_policy.prunes:
      y = conv_ops.batch_norm_frozen(x, mean, var, scale, bias,
                                     self.razor_policy.spec("layer_norm"), self.bn_epsilon)
    else:
      y = conv_ops.batch_norm_apply(x, mean, var, scale, bias, self.bn_epsilon)
    return y.astype(self.dtype)

  def _act(self, x):
    return conv_ops.relu6(x, compact=self.compact_relu)

  def conv_bn(self, name, bn_name, x, train, features, kernel=1, stride=1, groups=1,
              act=True):
    y = self._bn(bn_name, self._conv(name, x, features, kernel, stride, groups), train)
    return self._act(y) if act else y

  def block(self, i, x, blk: Block, train):
    prefix = "expanded_conv" if i == 0 else f"block_{i}"
    inp, c_in = x, x.shape[-1]
    hidden = blk.expansion * c_in
    if blk.expansion != 1:
      x = self.conv_bn(f"{prefix}_expand", f"{prefix}_expand_BN", x, train, hidden)
    x = self.conv_bn(f"{prefix}_depthwise", f"{prefix}_depthwise_BN", x, train, hidden,
                     blk.kernel, blk.stride, groups=hidden)
    x = self.conv_bn(f"{prefix}_project", f"{prefix}_project_BN", x, train, blk.features,
                     act=False)
    if self.finetune == "lite_residual+biases":
      x = x + LiteResidual(blk.features, blk.stride, name=f"{prefix}_lite_residual")(
          inp, x.shape[1:3], train)
    if blk.stride == 1 and c_in == blk.features:
      x = x + inp
    return x

  @nn.compact
  def __call__(self, images, train: bool = False):
    assert images.ndim == 4, f"expected images (batch, height, width, channels), got {images.shape}"
    stem, blocks, head = self.blocks()
    x = images.astype(self.dtype)
    x = self.conv_bn("Conv1", "bn_Conv1", x, train, stem, 3, 2)
    for i, blk in enumerate(blocks):
      x = self.block(i, x, blk, train)
    x = self.conv_bn("Conv_1", "Conv_1_bn", x, train, head)
    x = jnp.mean(x, axis=(1, 2))
    x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    p = self.param("predictions", _dense_param, (x.shape[-1], self.num_classes))
    kernel, bias = p["kernel"].astype(self.dtype), p["bias"].astype(self.dtype)
    if self.compression == "actnn":
      return actnn.dense(x, kernel, bias)
    # The classifier trains under every method; TinyTL keeps its input dense (it is tiny).
    spec = self.razor_policy.spec("dense") if self.finetune == "all" else None
    return ops.dense(x, kernel, bias, spec)


class LiteResidual(nn.Module):
  """TinyTL's lite residual branch (Cai et al. 2020), trained while the main branch is frozen.

  2x2 average pool, a grouped k x k conv (2 groups, the block's stride), BatchNorm,
  ReLU, a 1x1 conv to the block's output channels, a BatchNorm whose scale starts at
  zero (the branch starts as a no-op), then bilinear upsampling to the main branch's
  size. k is 5, shrunk to fit the pooled feature map (1 and a global pool at 1x1), as
  TinyTL's `insert_lite_residual` does. Its activations are stored densely (plain
  autodiff): they live at a quarter of the block's resolution.
  """
  features: int
  stride: int
  groups: int = 2
  max_kernel: int = 5

  @nn.compact
  def __call__(self, x, out_hw, train: bool):
    h = x.shape[1] // 2
    if h <= 1:
      x, k = jnp.mean(x, axis=(1, 2), keepdims=True), 1
    else:
      x = nn.avg_pool(x, (2, 2), (2, 2))
      k = self.max_kernel
      while h < k:
        k -= 2
    groups = self.groups if x.shape[-1] % self.groups == 0 else 1
    x = nn.Conv(x.shape[-1], (k, k), self.stride, padding=[(k // 2, k // 2)] * 2,
                feature_group_count=groups, use_bias=False, name="conv1")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3, name="bn1")(x)
    x = nn.relu(x)
    x = nn.Conv(self.features, (1, 1), use_bias=False, name="conv2")(x)
    x = nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-3,
                     scale_init=nn.initializers.zeros, name="final_bn")(x)
    return jax.image.resize(x, (x.shape[0],) + tuple(out_hw) + (x.shape[-1],), "bilinear")


def _kernel_param(rng, shape):
  # He (fan-out) normal, as Keras and torchvision initialize these convs.
  fan_out = shape[0] * shape[1] * shape[3]
  return {"kernel": jax.random.normal(rng, shape) * jnp.sqrt(2.0 / fan_out)}


def _bn_param(rng, c):
  del rng
  return {"scale": jnp.ones(c, jnp.float32), "bias": jnp.zeros(c, jnp.float32)}


def _dense_param(rng, shape):
  return {"kernel": jax.random.normal(rng, shape) * 0.01, "bias": jnp.zeros(shape[1:])}


# arch -> (description, padding)
ARCHS = {"mobilenet_v2": ("MobileNetV2", "SAME"),
         "proxyless_mobile": ("ProxylessNAS-Mobile", "SYMMETRIC"),
         "tiny": ("a 4-block CNN for tests and the digits demo", "SYMMETRIC")}


def MobileNetV2(width: float = 1.0, **kwargs) -> CNN:  # pylint: disable=invalid-name
  """MobileNetV2 at `width` (0.35-1.4 for the public weights); see `CNN` for the fields."""
  return CNN(arch="mobilenet_v2", width=width, **kwargs)


def ProxylessMobile(**kwargs) -> CNN:  # pylint: disable=invalid-name
  """ProxylessNAS-Mobile; see `CNN` for the fields."""
  return CNN(arch="proxyless_mobile", **kwargs)


def param_count(params) -> int:
  return sum(a.size for a in jax.tree.leaves(params))
