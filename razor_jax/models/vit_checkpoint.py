"""Reading and writing the public ViT checkpoints (google-research/vision_transformer .npz).

The public files are flat .npz archives keyed by '/'-joined parameter paths. Inside
an encoder block they keep the pre-linen names, numbered by one counter across the
block's modules (`LayerNorm_0`, `MultiHeadDotProductAttention_1`, `LayerNorm_2`,
`MlpBlock_3`); linen numbers each module type on its own (`LayerNorm_0`,
`MultiHeadDotProductAttention_0`, `LayerNorm_1`, `MlpBlock_0`). Loading renames them
with flax's `convert_pre_linen`; `export` writes the pre-linen names back. Blocks are
stored one per `encoderblock_{i}`; a scanned model stacks them under `encoderblock`.
"""
from __future__ import annotations

import io
import logging
import re
from typing import Any, Mapping

import jax
import numpy as np
import scipy.ndimage
from flax import traverse_util

# An encoder block's modules by their linen names -> the public files' pre-linen names
# (one counter over the block's modules in call order).
_PRE_LINEN = {"LayerNorm_0": "LayerNorm_0", "MultiHeadDotProductAttention_0":
              "MultiHeadDotProductAttention_1", "LayerNorm_1": "LayerNorm_2",
              "MlpBlock_0": "MlpBlock_3"}
_BLOCK = re.compile(r"^Transformer/encoderblock_(\d+)/([^/]+)/(.+)$")
_POSEMB = "Transformer/posembed_input/pos_embedding"


class CheckpointMismatchError(ValueError):
  """A checkpoint whose parameters do not fit the model."""


def _flatten(tree: Mapping) -> dict:
  """{'a': {'b': x}} -> {'a/b': x}."""
  return traverse_util.flatten_dict(dict(tree), sep="/")


def _to_linen(flat: Mapping) -> dict:
  """The flat arrays of a checkpoint with linen's names (already linen names stay)."""
  # flax.training imports orbax (and TensorFlow where it is installed): only when loading.
  from flax.training import checkpoints  # pylint: disable=g-import-not-at-top
  tree = traverse_util.unflatten_dict(dict(flat), sep="/")
  return _flatten(checkpoints.convert_pre_linen(tree))


def _to_pre_linen(flat: Mapping) -> dict:
  """Unrolled linen params, flat, with the public files' names inside each block."""
  out = {}
  for path, value in flat.items():
    match = _BLOCK.match(path)
    if match:
      block, module, rest = match.groups()
      path = f"Transformer/encoderblock_{block}/{_PRE_LINEN.get(module, module)}/{rest}"
    out[path] = value
  return out


def unstack_blocks(flat: Mapping) -> dict:
  """Scanned layout (Transformer/encoderblock/... with a layer axis) -> one entry per block."""
  out = {}
  for path, value in flat.items():
    if path.startswith("Transformer/encoderblock/"):
      rest = path[len("Transformer/encoderblock/"):]
      for i in range(value.shape[0]):
        out[f"Transformer/encoderblock_{i}/{rest}"] = value[i]
    else:
      out[path] = value
  return out


def _stack(flat: Mapping, num_layers: int) -> dict:
  """One entry per block -> the scanned layout."""
  out, blocks = {}, {}
  for path, value in flat.items():
    m = re.match(r"^Transformer/encoderblock_(\d+)/(.+)$", path)
    if m:
      blocks.setdefault(m.group(2), {})[int(m.group(1))] = value
    else:
      out[path] = value
  for rest, per_layer in blocks.items():
    if sorted(per_layer) != list(range(num_layers)):
      # Left unstacked, so the mismatch report names these keys.
      out.update({f"Transformer/encoderblock_{i}/{rest}": v for i, v in per_layer.items()})
      continue
    out[f"Transformer/encoderblock/{rest}"] = np.stack([per_layer[i] for i in range(num_layers)])
  return out


def _is_scanned(flat: Mapping) -> bool:
  return any(p.startswith("Transformer/encoderblock/") for p in flat)


def resample_posemb(posemb: np.ndarray, num_tokens: int, has_cls: bool) -> np.ndarray:
  """Resizes a (1, tokens, d) position embedding to `num_tokens` (bilinear on the grid)."""
  extra = 1 if has_cls else 0
  head, grid = posemb[:, :extra], posemb[0, extra:]
  old, new = int(round(np.sqrt(len(grid)))), int(round(np.sqrt(num_tokens - extra)))
  if old * old != len(grid) or new * new != num_tokens - extra:
    raise CheckpointMismatchError(
        f"cannot resample position embedding of {posemb.shape[1]} tokens to {num_tokens}:"
        " both grids must be square")
  grid = grid.reshape(old, old, -1)
  grid = scipy.ndimage.zoom(grid, (new / old, new / old, 1), order=1)
  return np.concatenate([head, grid.reshape(1, new * new, -1)], axis=1).astype(posemb.dtype)


def read_npz(path: str) -> dict:
  """The arrays of a local or remote (gs://, via etils.epath) .npz, by key."""
  from etils import epath  # flax depends on etils
  p = epath.Path(path)
  try:
    data = p.read_bytes()
  except FileNotFoundError:
    raise FileNotFoundError(
        f"checkpoint {path} not found. The public ViT checkpoints are at"
        " gs://vit_models/imagenet21k/ (e.g. ViT-B_16.npz); download one with"
        " `gsutil cp gs://vit_models/imagenet21k/ViT-B_16.npz .` and pass its path") from None
  with np.load(io.BytesIO(data), allow_pickle=False) as npz:
    return {k: npz[k] for k in npz.files}


def _shape(a) -> tuple:
  return tuple(np.shape(a))


def load_pretrained(path_or_arrays: Any, init_params: Mapping, *, has_cls: bool = True,
                    keep_head: bool = True, log: logging.Logger | None = None) -> dict:
  """Params for a model from a public ViT checkpoint.

  Args:
    path_or_arrays: path of the .npz (local, or remote through etils.epath /
      tf.io.gfile), or a dict of its arrays.
    init_params: the model's freshly initialised params (arrays or ShapeDtypeStructs
      are read for shape and dtype; the head and missing pre_logits come from here).
    has_cls: whether the model has a cls token (classifier "token").
    keep_head: False takes the model's new head even when the checkpoint's fits (a
      fine-tuning task whose classes differ from pretraining's but number the same).
  Returns:
    A params tree shaped like `init_params`: the checkpoint's arrays in the model's
    layout (scanned or unrolled) and dtypes. The head is the checkpoint's when its
    shape matches, else `init_params`' (a new head for a new number of classes);
    `pre_logits` is dropped when the model has none; the position embedding is
    resampled to the model's grid.
  Raises:
    CheckpointMismatchError listing missing and unexpected keys with their shapes.
  """
  log = log or logging.getLogger(__name__)
  arrays = read_npz(path_or_arrays) if isinstance(path_or_arrays, (str, bytes)) or hasattr(
      path_or_arrays, "__fspath__") else dict(path_or_arrays)
  init = _flatten(init_params)
  ckpt = _to_linen(arrays)
  if _is_scanned(ckpt):
    ckpt = unstack_blocks(ckpt)
  if _is_scanned(init):
    num_layers = _shape(init[next(p for p in init if p.startswith("Transformer/encoderblock/"))])[0]
    ckpt = _stack(ckpt, num_layers)

  if not any(p.startswith("pre_logits/") for p in init):
    dropped = [p for p in ckpt if p.startswith("pre_logits/")]
    if dropped:
      log.info("dropping pre_logits from the checkpoint (the model has no representation layer)")
    ckpt = {p: v for p, v in ckpt.items() if not p.startswith("pre_logits/")}

  out, mismatched = {}, []
  for path, target in init.items():
    if path not in ckpt:
      continue
    value = np.asarray(ckpt[path])
    if path.startswith("head/") and (_shape(value) != _shape(target) or not keep_head):
      log.info("head %s: checkpoint %s, model %s; using the model's new head", path,
               _shape(value), _shape(target))
      value = (np.zeros(target.shape, target.dtype)
               if isinstance(target, jax.ShapeDtypeStruct) else np.asarray(target))
    elif path == _POSEMB and _shape(value) != _shape(target):
      log.info("resampling position embedding %s -> %s", _shape(value), _shape(target))
      value = resample_posemb(value, _shape(target)[1], has_cls)
    if _shape(value) != _shape(target):
      mismatched.append(f"{path}: checkpoint {_shape(value)}, model {_shape(target)}")
      continue
    out[path] = value.astype(target.dtype)

  missing = [f"{p} {_shape(v)}" for p, v in init.items() if p not in ckpt]
  unexpected = [f"{p} {_shape(v)}" for p, v in ckpt.items() if p not in init]
  if missing or unexpected or mismatched:
    lines = ["checkpoint does not match the model:"]
    for title, items in (("missing from the checkpoint", missing),
                         ("unexpected in the checkpoint", unexpected),
                         ("shape mismatch", mismatched)):
      if items:
        lines.append(f"  {title} ({len(items)}):")
        lines.extend(f"    {item}" for item in sorted(items))
    raise CheckpointMismatchError("\n".join(lines))
  return traverse_util.unflatten_dict(out, sep="/")


def export(params: Mapping, path: str) -> None:
  """Writes params in the public .npz format (unrolled blocks, pre-linen names)."""
  from etils import epath
  flat = {p: np.asarray(v) for p, v in _flatten(params).items()}
  flat = _to_pre_linen(unstack_blocks(flat))
  buf = io.BytesIO()
  np.savez(buf, **flat)
  epath.Path(path).write_bytes(buf.getvalue())
