"""Every field the trainer reads, with its default and meaning; named configs start here.

experiments/configs/NAME.py calls `get_config()` and changes what differs for its run;
`razor_jax.train.run` fills a partial config from these defaults, so the Python API
takes a dict with just the fields that matter.
"""
from __future__ import annotations

import difflib
from typing import Iterable

import ml_collections
from flax import traverse_util
from ml_collections import config_dict

from razor_jax.policy import DEFAULT_PRUNE_RATIO

OPTIMIZERS = ("sgd", "adam", "adamw")
# config.model.name -> what it builds (razor_jax.models).
MODELS = {"vit": "a ViT (razor_jax.models.vit.ViT)",
          "mobilenet_v2": "MobileNetV2 (razor_jax.models.mobilenet)",
          "proxyless_mobile": "ProxylessNAS-Mobile (razor_jax.models.mobilenet)",
          "tiny_cnn": "the 4-block CNN of the offline CNN demo (razor_jax.models.mobilenet)"}
CNN_MODELS = ("mobilenet_v2", "proxyless_mobile", "tiny_cnn")
# Fields of config.model that only one family reads (the others are shared: name, dropout_rate).
VIT_FIELDS = ("variant", "patch_size", "hidden_size", "mlp_dim", "num_heads", "num_layers",
              "representation_size", "classifier", "scan", "remat", "batch_chunk")
CNN_FIELDS = ("width", "batch_norm", "compression", "finetune")
DTYPES = ("float32", "bfloat16")
# Public ImageNet-21k checkpoints of the original ViT release (google-research/vision_transformer).
PUBLIC_CHECKPOINTS = "gs://vit_models/imagenet21k"


def get_config() -> ml_collections.ConfigDict:
  """The defaults: ViT-B/16 on CUB-200-2011 with Back Razor's default policy (0.8)."""
  config = ml_collections.ConfigDict()

  # Data (razor_jax.data).
  config.dataset = "caltech_birds2011"  # a name in razor_jax.data.DATASETS
  config.data_dir = ""  # TFDS data_dir; "" is TFDS's default (~/tensorflow_datasets)
  config.manual_dir = ""  # manually downloaded archives; "" is <data_dir>/downloads/manual
  config.image_size = 224  # square input side in pixels; the public checkpoints are 224
  config.batch_size = 128  # global batch over all devices and hosts
  config.eval_batch_size = 0  # 0 = batch_size; must also divide by the device count
  # Smallest area of the random training crop, as a fraction of the image (the original
  # CNN runs' resize_scale, 0.22 there); None = the dataset's own (razor_jax.data).
  config.crop_area_min = config_dict.placeholder(float)

  # Model: config.model.name picks it (one of MODELS); the ViT's fields, then the CNNs'.
  config.model = ml_collections.ConfigDict()
  config.model.name = "vit"  # "vit", "mobilenet_v2", "proxyless_mobile" or "tiny_cnn"
  # ViT (razor_jax.models.vit.ViT) only: a CNN run leaves these at their defaults.
  config.model.variant = "B/16"  # a named size ("B/16", "L/16", ...); "" to give sizes below
  # Sizes for variant=""; unset (None) fields keep the ViT's defaults.
  config.model.patch_size = config_dict.placeholder(int)  # patch side in pixels
  config.model.hidden_size = config_dict.placeholder(int)  # token width
  config.model.mlp_dim = config_dict.placeholder(int)  # MLP hidden width
  config.model.num_heads = config_dict.placeholder(int)  # attention heads
  config.model.num_layers = config_dict.placeholder(int)  # transformer blocks
  config.model.representation_size = config_dict.placeholder(int)  # pre-logits width; None = none
  config.model.classifier = "token"  # "token" ([CLS]) or "gap" (mean over patch tokens)
  config.model.dropout_rate = 0.0  # dropout in the ViT's MLP blocks / before a CNN's classifier
  config.model.scan = True  # scan over identical blocks (razor_jax.scan): one compiled body
  config.model.remat = False  # recompute each block in the backward (trades time for memory)
  # Samples per slice when the scanned, pruned blocks run; None = the ViT's (32 on CPU,
  # the whole batch on GPU: razor_jax.policy.auto_batch_chunk).
  config.model.batch_chunk = config_dict.placeholder(int)
  # CNNs (razor_jax.models.mobilenet.CNN) only; unset (None) = the CNN's default.
  config.model.width = config_dict.placeholder(float)  # mobilenet_v2's multiplier; None = 1.0
  # BatchNorm while training: "train" (batch statistics, running averages updated: the
  # state carries them), "frozen" (running statistics; scale and bias train) or "fixed"
  # (frozen, scale and bias too: the paper's CNN runs). None = "train".
  config.model.batch_norm = config_dict.placeholder(str)
  # "razor" (Back Razor at prune_ratio / policy) or "actnn" (every saved activation in 2
  # bits, the ActNN-style peer; needs prune_ratio=0). None = "razor".
  config.model.compression = config_dict.placeholder(str)
  # "all", "biases" (TinyTL-B) or "lite_residual+biases" (TinyTL-L+B); the TinyTL ones
  # freeze the weights and need prune_ratio=0. None = "all".
  config.model.finetune = config_dict.placeholder(str)
  # Pretrained weights; "" trains from scratch. ViT: the public .npz format; MobileNetV2:
  # Keras's ImageNet .h5; any CNN: a .npz of razor_jax.models.mobilenet_checkpoint.save_npz.
  config.init_path = f"{PUBLIC_CHECKPOINTS}/ViT-B_16.npz"
  config.keep_head = False  # True keeps the checkpoint's head if it fits (same classes)

  # Back Razor: forward dense, backward from a top-K copy of each activation (the ViT's
  # encoder's; the patch embedding and the head stay exact, as in the paper. A CNN's
  # convs, classifier and train-mode BatchNorms; ReLU6 keeps a 1-bit mask).
  # Fraction of each activation pruned; 0 = full fine-tuning. 0.8, razor_jax's default
  # (README, "The default policy"); the paper's is 0.9.
  config.prune_ratio = DEFAULT_PRUNE_RATIO
  config.policy = ml_collections.ConfigDict()  # razor_jax.Policy's fields; unset = prune_ratio
  # "default" (the fields below) or "paper" (razor_jax.Policy.paper(prune_ratio): the
  # original code's semantics; the fields below other than estimator are then ignored).
  config.policy.preset = "default"
  # Weight gradients: "none" (from the pruned copy, the paper's rule) or "energy" (that
  # copy rescaled per group by |a|^2 / |a_kept|^2; one float per group more).
  config.policy.estimator = "none"
  # Per op type (unset = prune_ratio): qkv/out projections and MLP layers (a CNN's classifier).
  config.policy.dense = config_dict.placeholder(float)
  config.policy.attention = config_dict.placeholder(float)  # QK^T and softmax(.)V (ViT only)
  # The attention probabilities softmax(.)V saves (unset = attention's ratio).
  config.policy.softmax = config_dict.placeholder(float)
  # Layer norms (a CNN's train-mode BatchNorms).
  config.policy.layer_norm = config_dict.placeholder(float)
  config.policy.conv = config_dict.placeholder(float)  # a CNN's convolutions (CNNs only)
  # Who competes for the K kept: "token" (a token's features, per row: one sort per row
  # block on GPU; the default everywhere) or "sample" (a whole sample, the paper's rule).
  config.policy.granularity = "token"
  config.policy.gelu_storage = "auto"  # "auto" (exact if nothing is pruned, else "uint2"),
  #                                      "uint8", "uint4", "uint2", "bfloat16" or "exact"
  # Kept values: "auto" (token rows: "ulog3" for the attention probabilities, "log4" for
  # convolutions, "sign" for the rest at 0.8 and above, "log4" below; a CNN's rows "log4"
  # throughout; sample groups: bf16 in 15 bits), "log4" (token rows:
  # 4-bit log levels, the default before 0.8), "sign" (token rows: 1 bit and a mean
  # magnitude per row), "int8", ...
  config.policy.value_format = "auto"
  # Per op type, "op:format" items joined by ";" (e.g. "attention:log4", or
  # "softmax:ulog3": the attention probabilities in log4's levels without the sign bit):
  # that op type's kept values in that format instead of value_format's.
  config.policy.value_formats = ""
  # Kept positions: "auto" (rows: "elias_fano"; groups: bitmask or indices), "indices", ...
  config.policy.position_format = "auto"

  # Optimization.
  config.total_steps = 6000  # optimizer updates
  config.lr = 0.01  # peak learning rate
  config.warmup_steps = 500  # linear warm-up from 0, then cosine decay to 0
  config.optimizer = ml_collections.ConfigDict()
  config.optimizer.name = "sgd"  # one of OPTIMIZERS
  config.optimizer.momentum = 0.9  # sgd only
  config.optimizer.nesterov = False  # sgd only
  config.optimizer.b1 = 0.9  # adam / adamw
  config.optimizer.b2 = 0.999  # adam / adamw
  config.optimizer.eps = 1e-8  # adam / adamw
  config.optimizer.weight_decay = 0.0  # decoupled for adamw; an L2 term for sgd and adam
  config.grad_clip_norm = 1.0  # clip the global gradient norm to this; 0 = no clipping
  config.label_smoothing = 0.0  # weight of the uniform target in the cross entropy
  config.grad_accum_steps = 1  # split each batch into this many sequential micro-batches
  config.dtype = "float32"  # compute dtype, "float32" or "bfloat16"; params stay float32

  # Devices. The mesh has axes ("data", "fsdp"); the batch is split over both.
  config.mesh = ml_collections.ConfigDict()
  config.mesh.data = -1  # devices on the data axis; -1 = all that fsdp leaves
  config.mesh.fsdp = 1  # devices that each parameter (and its optimizer state) is split over

  # Bookkeeping.
  config.seed = 0  # params init, data order and dropout: a run is a function of the seed
  config.log_every = 50  # steps between metric lines (JSON lines and TensorBoard)
  config.eval_every = 1000  # steps between evaluations; the last step always evaluates
  config.checkpoint_every = 500  # steps between checkpoints; the last step always saves
  config.keep_checkpoints = 3  # how many recent checkpoints stay on disk
  config.async_checkpointing = True  # write checkpoints in the background
  config.memory_report = True  # at start, compile full fine-tuning too to compare peaks
  config.progress_bar = True  # a tqdm bar on stderr (process 0 only)
  return config


def complete(config) -> ml_collections.ConfigDict:
  """`config` (a ConfigDict or dict, possibly partial) on top of the defaults, locked.

  Raises:
    KeyError: for a key the trainer does not know, naming the valid ones.
  """
  full = get_config()
  full.lock()
  given = config.to_dict() if isinstance(config, ml_collections.ConfigDict) else dict(config)
  check_keys(full, traverse_util.flatten_dict(given, sep="."))
  full.update(given)
  return full


def suggest(word: str, choices: Iterable[str]) -> str:
  """" (did you mean 'x'?)" for the choice closest to a misspelled `word`, else ""."""
  close = difflib.get_close_matches(word, list(choices), n=1)
  return f" (did you mean {close[0]!r}?)" if close else ""


def check_keys(config: ml_collections.ConfigDict, dotted_keys: Iterable[str]):
  """Raises KeyError for the first "a.b.c" of `dotted_keys` that is not a field of `config`.

  The message names the valid keys where the path went wrong, and a group given a value.
  """
  for dotted in dotted_keys:
    node, parts = config, dotted.split(".")
    for i, part in enumerate(parts):
      where = ".".join(parts[:i])
      if not isinstance(node, ml_collections.ConfigDict):
        raise KeyError(f"config key {where!r} is a value, not a group, so {dotted!r} does not"
                       " exist")
      if part not in node:
        under = f" under {where!r}" if where else ""
        unknown = ".".join(parts[:i + 1])
        raise KeyError(f"unknown config key {unknown!r}{suggest(part, node.keys())}; valid keys"
                       f"{under}: {', '.join(sorted(node.keys()))}")
      node = node[part]
    if isinstance(node, ml_collections.ConfigDict):
      raise KeyError(f"config key {dotted!r} is a group; set one of its fields:"
                     f" {', '.join(sorted(node.keys()))}")
