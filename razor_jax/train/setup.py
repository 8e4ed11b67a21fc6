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

from razor_jax.policy import Policy
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
  """config.init_path is a file, but not a readable .npz (truncated, text, another format)."""


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
  try:
    make_policy(config)
  except ValueError as e:
    raise ConfigError(str(e)) from None


def _round_up(x: int, multiple: int) -> int:
  return -(-x // multiple) * multiple


# The op types a ViT run can set apart (its patch embedding, a conv, stays exact).
POLICY_OP_TYPES = ("dense", "attention", "layer_norm")
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
                     position_format=config.policy.position_format,
                     gelu_storage=None if gelu in ("exact", "", None) else gelu,
                     estimator=estimator)


def build_model(config, num_classes: int, *, full_finetuning: bool = False):
  """The ViT of `config.model`, with Back Razor unless `full_finetuning`."""
  from razor_jax.models.vit import ViT  # pylint: disable=g-import-not-at-top
  kwargs = {k: v for k, v in config.model.items() if v is not None}
  kwargs["variant"] = kwargs.get("variant") or None
  return ViT(num_classes=num_classes, policy=make_policy(config, full_finetuning=full_finetuning),
             dtype=DTYPES[config.dtype], **kwargs)


def _image_shape(config, batch: int = 1) -> tuple:
  return (batch, config.image_size, config.image_size, 3)


def abstract_state(model, tx, config) -> TrainState:
  """Shapes and dtypes of the TrainState, computed without allocating it."""
  def init(rng):
    params = model.init(rng, jnp.zeros(_image_shape(config)), train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  return jax.eval_shape(init, jax.random.key(0))


def abstract_batch(config, batch_size: int, mesh) -> dict:
  s = sharding.batch_sharding(mesh)
  return {"image": jax.ShapeDtypeStruct(_image_shape(config, batch_size), jnp.float32, sharding=s),
          "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32, sharding=s),
          "mask": jax.ShapeDtypeStruct((batch_size,), jnp.float32, sharding=s)}


def check_init_path(path: str):
  """Raises CheckpointMissingError unless `path` names a readable file."""
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


def _check_npz(path: str):
  """Raises CheckpointUnreadableError unless `path` opens as a .npz holding arrays.

  Reads the zip's directory only (at the end of the file, so a truncated download fails
  here), in milliseconds, before the minute of compiling that np.load would come after.
  """
  fix = (" Download it again (a .npz in the public ViT format, e.g. from"
         f" {train_config.PUBLIC_CHECKPOINTS}/), or pass --config.init_path='' to train from"
         " scratch")
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
  init = lambda r: model.init(r, dummy, train=False)["params"]
  if config.init_path:
    # load_pretrained works on host arrays: initialize replicated (every host can read a
    # replicated array), then lay the loaded tree out as the params' shardings.
    from razor_jax.models.vit import load_pretrained  # pylint: disable=g-import-not-at-top
    params = jax.jit(init, out_shardings=sharding.replicated(mesh))(rng)
    try:
      params = load_pretrained(config.init_path, jax.device_get(params),
                               has_cls=config.model.classifier == "token",
                               keep_head=config.keep_head)
    except (KeyError, ValueError) as e:  # a checkpoint of another architecture
      raise ConfigError(f"init_path={config.init_path!r} does not fit the model of this"
                        f" config (model {config.model.to_dict()}): {e}") from None
    params = sharding.put_global(params, state_shardings.params)
  else:
    params = jax.jit(init, out_shardings=state_shardings.params)(rng)
  opt_state = jax.jit(tx.init, out_shardings=state_shardings.opt_state)(params)
  step = jax.jit(lambda: jnp.zeros((), jnp.int32), out_shardings=state_shardings.step)()
  return TrainState(step=step, params=params, opt_state=opt_state)


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
  """eval_step(params, batch) jitted, its sums replicated."""
  return jax.jit(make_eval_step(model), out_shardings=sharding.replicated(mesh))


def _abstract_rng(mesh):
  key = jax.eval_shape(lambda: jax.random.key(0))
  return jax.ShapeDtypeStruct(key.shape, key.dtype, sharding=sharding.replicated(mesh))
