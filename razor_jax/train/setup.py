"""Setting up a fine-tuning run: checks, the model, the sharded TrainState, the compiled step.

Everything here is reusable piecewise (the tests and the benchmarks build single steps
from it); razor_jax.train.loop strings it together into a run.
"""
from __future__ import annotations

import functools
import os
import zipfile

import jax
import jax.numpy as jnp
import ml_collections
import optax

from razor_jax.policy import OP_TYPES, Policy
from razor_jax.train import checkpoint, sharding
from razor_jax.train import config as train_config
from razor_jax.train.step import TrainState, make_eval_step, make_optimizer, make_train_step

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


class UserError(Exception):
  """A problem with the run's set-up that its message explains; the CLI prints no traceback."""


class ConfigError(UserError, ValueError):
  """A config value that cannot work (batch size vs devices, unknown optimizer, ...)."""


class CheckpointMissingError(UserError, FileNotFoundError):
  """config.init_path names no readable file."""


class CheckpointUnreadableError(UserError, ValueError):
  """config.init_path is a file, but not a readable .npz / .h5 (truncated, text, another format)."""


class NonFiniteLossError(UserError, FloatingPointError):
  """The loss or gradient became NaN or inf; the last good checkpoint is kept."""


def check_config(config, num_devices: int):
  """Raises ConfigError for values that cannot work, before anything is compiled or read."""
  if config.optimizer.name not in train_config.OPTIMIZERS:
    raise ConfigError(f"optimizer.name must be one of {train_config.OPTIMIZERS},"
                      f" got {config.optimizer.name!r}")
  if config.dtype not in DTYPES:
    raise ConfigError(f"dtype must be one of {tuple(DTYPES)}, got {config.dtype!r}")
  for name in ("total_steps", "batch_size", "grad_accum_steps", "log_every", "eval_every",
               "checkpoint_every", "image_size"):
    if config[name] < 1:
      raise ConfigError(f"{name} must be at least 1, got {config[name]}")
  if config.crop_area_min is not None and not 0.0 < config.crop_area_min <= 1.0:
    raise ConfigError(f"crop_area_min must be in (0, 1] (a fraction of the image's area) or"
                      f" None for the dataset's own, got {config.crop_area_min}")
  accum = config.grad_accum_steps
  if config.batch_size % accum:
    raise ConfigError(f"batch_size={config.batch_size} is not divisible by"
                      f" grad_accum_steps={accum}")
  micro = config.batch_size // accum
  processes = jax.process_count()
  devices = (f"{num_devices}" if processes == 1 else
             f"{num_devices}, over all {processes} processes: batch_size is the global batch")
  if micro % num_devices:
    what = "batch_size" if accum == 1 else f"batch_size / grad_accum_steps = {micro}"
    raise ConfigError(
        f"{what} must be divisible by the number of devices ({devices}): each device"
        f" gets an equal share. Use e.g. --config.batch_size={_round_up(micro, num_devices) * accum},"
        f" or fewer devices with --config.mesh.data=K")
  eval_batch = config.eval_batch_size or config.batch_size
  if eval_batch % num_devices:
    raise ConfigError(f"eval_batch_size={eval_batch} must be divisible by the number of"
                      f" devices ({devices})")
  _check_model_name(config)
  if config.model.name in train_config.CNN_MODELS:
    _check_cnn(config)
  else:
    _check_vit(config)
  try:
    make_policy(config)
    build_model(config, num_classes=2)  # the model's own checks (a dataclass: nothing runs)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _check_model_name(config):
  name = config.model.name
  if name not in train_config.MODELS:
    listed = "; ".join(f"{k!r}: {v}" for k, v in train_config.MODELS.items())
    close = train_config.suggest(name, train_config.MODELS)
    raise ConfigError(f"unknown model.name {name!r}{close}; expected one of {listed}")


def _check_vit(config):
  cnn_only = [f"model.{k}={config.model[k]!r}" for k in train_config.CNN_FIELDS
              if config.model[k] is not None]
  if config.policy.conv is not None:
    cnn_only.append(f"policy.conv={config.policy.conv!r}")
  if cnn_only:
    raise ConfigError(f"{', '.join(cnn_only)} only apply to CNNs, but model.name='vit'; set"
                      f" --config.model.name to one of {', '.join(train_config.CNN_MODELS)},"
                      " or leave these unset")
  if config.model.variant and any(
      config.model[k] is not None
      for k in ("patch_size", "hidden_size", "mlp_dim", "num_heads", "num_layers")):
    raise ConfigError(f"model.variant={config.model.variant!r} sets the ViT's sizes; to give"
                      " sizes yourself also pass --config.model.variant=''")
  from razor_jax.models.vit import VARIANTS  # pylint: disable=g-import-not-at-top
  variant = config.model.variant
  if variant and variant not in VARIANTS:
    raise ConfigError(f"unknown model.variant {variant!r}; expected one of"
                      f" {', '.join(VARIANTS)}, or '' with explicit sizes")
  patch = VARIANTS[variant][0] if variant else config.model.patch_size or 16
  if config.image_size % patch:
    raise ConfigError(f"image_size={config.image_size} must be a multiple of the patch size"
                      f" ({patch})")


def _check_cnn(config):
  from razor_jax.models import mobilenet  # pylint: disable=g-import-not-at-top
  model, name = config.model, config.model.name
  defaults = train_config.get_config()
  vit_only = [f"model.{k}={model[k]!r}" for k in train_config.VIT_FIELDS
              if model[k] != defaults.model[k]]
  for op_type in ("attention", "softmax"):
    if config.policy[op_type] is not None:
      vit_only.append(f"policy.{op_type}={config.policy[op_type]!r}")
  if vit_only:
    raise ConfigError(f"{', '.join(vit_only)} only apply to the ViT, but model.name={name!r}"
                      f" (a CNN); leave them at their defaults (CNN fields:"
                      f" {', '.join(train_config.CNN_FIELDS)})")
  if model.width is not None and name != "mobilenet_v2":
    raise ConfigError(f"model.width={model.width} is MobileNetV2's width multiplier; model.name"
                      f"={name!r} has one size: leave model.width unset")
  for field, allowed in (("batch_norm", mobilenet.BATCH_NORM_MODES),
                         ("compression", mobilenet.COMPRESSIONS),
                         ("finetune", mobilenet.FINETUNE)):
    if model[field] is not None and model[field] not in allowed:
      raise ConfigError(f"model.{field} must be one of {allowed} (or unset), got {model[field]!r}")
  # These methods store activations their own way: a prune ratio would be silently unused.
  other = ("model.compression='actnn' keeps activations in 2 bits"
           if model.compression == "actnn" else
           f"model.finetune={model.finetune!r} (TinyTL) freezes the weights"
           if model.finetune not in (None, "all") else None)
  if other and config.prune_ratio != 0.0:
    raise ConfigError(f"{other} instead of pruning them; pass --config.prune_ratio=0 with it"
                      f" (got prune_ratio={config.prune_ratio})")


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


# The op types a run can set apart, each a config.policy field: a ViT's dense, attention
# (softmax: its probabilities) and layer_norm (its patch embedding, a conv, stays exact);
# a CNN's conv, dense (the classifier) and layer_norm (train-mode BatchNorm).
POLICY_OP_TYPES = OP_TYPES
POLICY_PRESETS = ("default", "paper")


def make_policy(config, *, full_finetuning: bool = False) -> Policy:
  """The Back Razor policy of `config`; `Policy(0.0)` (plain autodiff) for full fine-tuning."""
  if full_finetuning:
    return Policy(0.0)
  preset = config.policy.get("preset", "default")
  estimator = config.policy.get("estimator", "none")
  if preset not in POLICY_PRESETS:
    raise ValueError(f"config.policy.preset must be one of {POLICY_PRESETS}, got {preset!r}")
  if preset == "paper":
    return Policy.paper(config.prune_ratio, estimator=estimator)
  per_op = {op: config.policy[op] for op in POLICY_OP_TYPES if config.policy[op] is not None}
  gelu = config.policy.gelu_storage
  return Policy.make(config.prune_ratio, ratios=per_op, granularity=config.policy.granularity,
                     value_format=config.policy.value_format,
                     value_formats=parse_value_formats(config.policy.get("value_formats", "")),
                     position_format=config.policy.position_format,
                     gelu_storage=None if gelu in ("exact", "", None) else gelu,
                     estimator=estimator)


def parse_value_formats(text: str) -> tuple:
  """"attention:log4;dense:sign" -> (("attention", "log4"), ("dense", "sign")).

  Raises:
    ValueError: an item that is not op:format, with what was expected (the op types and
      formats themselves are checked by Policy).
  """
  items = []
  for item in filter(None, (part.strip() for part in (text or "").split(";"))):
    op_type, sep, value_format = item.partition(":")
    if not sep or not op_type or not value_format:
      raise ValueError(f"config.policy.value_formats items are op:format joined by ';' (e.g."
                       f" 'attention:log4'), got {item!r}")
    items.append((op_type.strip(), value_format.strip()))
  return tuple(sorted(items))


def build_model(config, num_classes: int, *, full_finetuning: bool = False):
  """The model config.model.name names, with Back Razor unless `full_finetuning`.

  `full_finetuning` gives the same parameters with plain autodiff (the ActNN-style
  compression off too): what evaluation runs and the memory report compares with.
  """
  if config.model.name in train_config.CNN_MODELS:
    return _build_cnn(config, num_classes, full_finetuning)
  from razor_jax.models.vit import ViT  # pylint: disable=g-import-not-at-top
  kwargs = {k: config.model[k] for k in train_config.VIT_FIELDS + ("dropout_rate",)
            if config.model[k] is not None}
  kwargs["variant"] = kwargs.get("variant") or None
  return ViT(num_classes=num_classes, policy=make_policy(config, full_finetuning=full_finetuning),
             dtype=DTYPES[config.dtype], **kwargs)


def _build_cnn(config, num_classes: int, full_finetuning: bool):
  from razor_jax.models.mobilenet import CNN  # pylint: disable=g-import-not-at-top
  kwargs = {k: config.model[k] for k in train_config.CNN_FIELDS if config.model[k] is not None}
  if full_finetuning:
    kwargs.pop("compression", None)
  # ActNN-style compression takes no policy; TinyTL ignores it (prune_ratio is 0 there).
  actnn = kwargs.get("compression") == "actnn"
  policy = None if actnn else make_policy(config, full_finetuning=full_finetuning)
  return CNN(arch="tiny" if config.model.name == "tiny_cnn" else config.model.name,
             num_classes=num_classes, policy=policy, dropout_rate=config.model.dropout_rate,
             dtype=DTYPES[config.dtype], **kwargs)


def mask_frozen(tx: optax.GradientTransformation, model) -> optax.GradientTransformation:
  """`tx` on the params `model` trains; those it freezes get no update and no state.

  A frozen param's gradient is zero already, but weight decay would still move it and
  Adam would keep two moments for it. Models without a `trainable` rule (the ViT) train
  everything: `tx` unchanged.
  """
  trainable = getattr(model, "trainable", None)
  if trainable is None:
    return tx
  labels = lambda params: jax.tree.map(lambda t: "train" if t else "frozen", trainable(params))
  return optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)


def _image_shape(config, batch: int = 1) -> tuple:
  return (batch, config.image_size, config.image_size, 3)


def _init_variables(model, rng, images) -> tuple:
  """(params, batch_stats) of a fresh `model`; batch_stats is {} for a model without them."""
  variables = model.init(rng, images, train=False)
  return variables["params"], variables.get("batch_stats", {})


def abstract_state(model, tx, config) -> TrainState:
  """Shapes and dtypes of the TrainState, computed without allocating it."""
  def init(rng):
    params, batch_stats = _init_variables(model, rng, jnp.zeros(_image_shape(config)))
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      batch_stats=batch_stats)
  return jax.eval_shape(init, jax.random.key(0))


def abstract_batch(config, batch_size: int, mesh) -> dict:
  s = sharding.batch_sharding(mesh)
  return {"image": jax.ShapeDtypeStruct(_image_shape(config, batch_size), jnp.float32, sharding=s),
          "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=s),
          "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=s)}


# Where a CNN's pretrained weights come from, for the error that finds none.
_CNN_WEIGHTS = {
    "mobilenet_v2": (
        "Keras's ImageNet MobileNetV2 .h5 (e.g. mobilenet_v2_weights_tf_dim_ordering_tf_kernels"
        "_1.0_224.h5 from https://storage.googleapis.com/tensorflow/keras-applications/"
        "mobilenet_v2/, the file of your model.width), or a .npz of"
        " razor_jax.models.mobilenet_checkpoint.save_npz"),
    "proxyless_mobile": (
        "a .npz of razor_jax.models.mobilenet_checkpoint.save_npz (ProxylessNAS-Mobile's"
        " ImageNet weights are published as a PyTorch pickle, which razor_jax does not read:"
        " convert them to that layout)"),
    "tiny_cnn": ("a .npz of razor_jax.models.mobilenet_checkpoint.save_npz, such as"
                 " experiments/assets/cnn_demo_digits.npz (experiments/cnn_digits.py writes it)"),
}


def check_init_path(path: str, model_name: str = "vit"):
  """Raises CheckpointMissingError unless `path` names a readable file for `model_name`."""
  if model_name in train_config.CNN_MODELS:
    _check_cnn_init_path(path, model_name)
    return
  try:
    if "://" in path:
      from etils import epath  # pylint: disable=g-import-not-at-top
      exists = epath.Path(path).exists()
    else:
      exists = os.path.isfile(path)
  except Exception as e:  # pylint: disable=broad-except
    exists, reason = False, f" ({type(e).__name__}: {e})"
  else:
    reason = ""
  if not exists:
    name = os.path.basename(path)
    name = name if name.startswith("ViT-") else "ViT-B_16.npz"
    raise CheckpointMissingError(
        f"pretrained checkpoint not found: init_path={path!r}{reason}. It should be a .npz in"
        f" the public ViT format; the ImageNet-21k ones are at {train_config.PUBLIC_CHECKPOINTS}/"
        f" (e.g. `gsutil cp {train_config.PUBLIC_CHECKPOINTS}/{name} .`, or"
        f" https://storage.googleapis.com/vit_models/imagenet21k/{name}); pass its local path"
        " as --config.init_path=PATH, or --config.init_path='' to train from scratch")
  if "://" not in path:
    _check_npz(path)


def _check_cnn_init_path(path: str, model_name: str):
  expected = _CNN_WEIGHTS[model_name]
  fix = (f"{model_name} reads {expected}; pass its local path as --config.init_path=PATH, or"
         " --config.init_path='' to train from scratch (random initialization)")
  if "://" in path:
    raise CheckpointMissingError(f"init_path={path!r}: a CNN's weights are read from a local"
                                 f" file; download it first. {fix}")
  if not os.path.isfile(path):
    raise CheckpointMissingError(f"pretrained weights not found: init_path={path!r}. {fix}")
  if path.endswith(".h5"):
    if model_name != "mobilenet_v2":
      raise CheckpointUnreadableError(f"init_path={path!r}: Keras .h5 weights exist for"
                                      f" MobileNetV2 only, not {model_name}. {fix}")
    with open(path, "rb") as f:
      if f.read(8) != b"\x89HDF\r\n\x1a\n":
        raise CheckpointUnreadableError(f"init_path={path!r} is not an HDF5 file. {fix}")
  else:
    _check_npz(path, fix=f" {fix}")


def _check_npz(path: str, fix: str = ""):
  """Raises CheckpointUnreadableError unless `path` opens as a .npz holding arrays.

  Reads the zip's directory only (at the end of the file, so a truncated download fails
  here), in milliseconds, before the minute of compiling that np.load would come after.
  """
  fix = fix or (" Download it again (a .npz in the public ViT format, e.g. from"
                f" {train_config.PUBLIC_CHECKPOINTS}/), or pass --config.init_path='' to train"
                " from scratch")
  try:
    with zipfile.ZipFile(path) as archive:
      names = archive.namelist()
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    with open(path, "rb") as f:
      head = f.read(512)
    size = os.path.getsize(path)
    if head[:4] == b"PK\x03\x04":
      what = f"a truncated or damaged .npz ({size} bytes; {e})"
    elif head and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
      what = f"a text file ({size} bytes, starting {head[:40].decode(errors='replace')!r})"
    else:
      what = f"not a .npz archive ({size} bytes; {e})"
    raise CheckpointUnreadableError(f"init_path={path!r} is {what}.{fix}") from None
  if not names or not any(name.endswith(".npy") for name in names):
    raise CheckpointUnreadableError(f"init_path={path!r} is a zip archive without .npy"
                                    f" arrays, not a .npz checkpoint.{fix}")


def init_state(model, tx, config, mesh, state_shardings, rng) -> TrainState:
  """A fresh TrainState laid out as `state_shardings`, from config.init_path if set."""
  dummy = jnp.zeros(_image_shape(config))
  rng = sharding.replicated_key(rng, mesh)  # an input every process can pass to jit
  init = lambda r: _init_variables(model, r, dummy)
  if config.init_path:
    # The loaders work on host arrays: initialize replicated (every host can read a
    # replicated array), then lay the loaded trees out as the state's shardings.
    params, batch_stats = jax.device_get(
        jax.jit(init, out_shardings=sharding.replicated(mesh))(rng))
    try:
      params, batch_stats = _load_pretrained(config, params, batch_stats)
    except (KeyError, ValueError) as e:  # a checkpoint of another architecture
      raise ConfigError(f"init_path={config.init_path!r} does not fit the model of this"
                        f" config (model {config.model.to_dict()}): {e}") from None
    params = sharding.put_global(params, state_shardings.params)
    batch_stats = sharding.put_global(batch_stats, state_shardings.batch_stats)
  else:
    params, batch_stats = jax.jit(
        init, out_shardings=(state_shardings.params, state_shardings.batch_stats))(rng)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=state_shardings.step)()
  return TrainState(step=step, params=params, opt_state=opt_state, batch_stats=batch_stats)


def _load_pretrained(config, params, batch_stats) -> tuple:
  """(params, batch_stats) with config.init_path's weights; a new head unless keep_head."""
  path = config.init_path
  if config.model.name not in train_config.CNN_MODELS:
    from razor_jax.models.vit import load_pretrained  # pylint: disable=g-import-not-at-top
    return load_pretrained(path, params, has_cls=config.model.classifier == "token",
                           keep_head=config.keep_head), batch_stats
  from razor_jax.models import mobilenet_checkpoint  # pylint: disable=g-import-not-at-top
  # keep_head=True takes the file's classifier where it fits, as the ViT's loader does;
  # otherwise the model's freshly initialized one is trained for the new classes.
  keep_head = None if config.keep_head else False
  load = (mobilenet_checkpoint.load_keras_h5 if path.endswith(".h5")
          else mobilenet_checkpoint.load_npz)
  return load(path, params, batch_stats, keep_head=keep_head)


def jit_train_step(train_step, mesh, state_shardings):
  """`train_step` jitted with the state donated and the batch split over the mesh."""
  batch = sharding.batch_sharding(mesh)
  replicated = sharding.replicated(mesh)
  return jax.jit(train_step,
                 in_shardings=(state_shardings, {"image": batch, "label": batch, "mask": batch},
                               replicated),
                 out_shardings=(state_shardings, replicated),
                 donate_argnums=0)


def make_step(model, config, mesh):
  """(tx, abstract state with shardings, jitted train step) for `model` under `config`."""
  tx, schedule = make_optimizer(config)
  tx = mask_frozen(tx, model)
  abstract = abstract_state(model, tx, config)
  shardings = sharding.tree_shardings(mesh, abstract)
  micro = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(None, sharding.BATCH_AXES))
  step = make_train_step(model, tx, schedule, label_smoothing=config.label_smoothing,
                         grad_accum_steps=config.grad_accum_steps, micro_batch_sharding=micro)
  return tx, checkpoint.abstract_like(abstract, shardings), jit_train_step(step, mesh, shardings)


# Fields that never reach the compiled train step (the model carries num_classes).
_NOT_IN_STEP = ("dataset", "data_dir", "manual_dir", "eval_batch_size", "init_path", "keep_head",
                "seed",
                "log_every", "eval_every", "checkpoint_every", "keep_checkpoints",
                "async_checkpointing", "memory_report", "progress_bar")


def compile_step(model, config, mesh):
  """(tx, abstract state, compiled train step) for a global batch of config.batch_size."""
  key = config.to_dict()
  for name in _NOT_IN_STEP:
    key.pop(name, None)
  return _compile_step(model, ml_collections.FrozenConfigDict(key), mesh)


# A second run() in one process (resuming, sweeps, tests) reuses the executable rather
# than compiling the same step again; the key holds everything the step depends on.
@functools.lru_cache(maxsize=4)
def _compile_step(model, config: ml_collections.FrozenConfigDict, mesh):
  tx, abstract, jitted = make_step(model, config, mesh)
  compiled = jitted.lower(abstract, abstract_batch(config, config.batch_size, mesh),
                          _abstract_rng(mesh)).compile()
  return tx, abstract, compiled


@functools.lru_cache(maxsize=4)
def jit_eval_step(model, mesh):
  """eval_step(variables, batch) jitted, its sums replicated."""
  return jax.jit(make_eval_step(model), out_shardings=sharding.replicated(mesh))


def _abstract_rng(mesh):
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
