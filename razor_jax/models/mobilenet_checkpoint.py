"""Keras's public ImageNet MobileNetV2 weights (`.h5`, read with h5py: nothing is unpickled).

The files are those `keras.applications.MobileNetV2(weights="imagenet")` downloads,
`mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{width}_224.h5` (with the classifier;
`..._no_top.h5` without) from
https://storage.googleapis.com/tensorflow/keras-applications/mobilenet_v2/, widths
0.35, 0.5, 0.75, 1.0, 1.3 and 1.4. Their layout is Keras's HDF5 weights format: the
root (or its `model_weights` group, in a whole saved model) lists `layer_names`; each
layer's group lists its `weight_names`, datasets such as `Conv1/kernel:0`,
`bn_Conv1/gamma:0`, `block_1_depthwise/depthwise_kernel:0`, `predictions/bias:0`
(Keras 3 writes the same without ":0", and "kernel" for the depthwise ones).

`razor_jax.models.mobilenet.CNN` uses Keras's layer names, so the mapping is per
weight: kernels as they are (HWIO), depthwise kernels (k, k, C, 1) to flax's grouped
layout (k, k, 1, C), BatchNorm gamma/beta to params scale/bias and moving_mean /
moving_variance to batch_stats mean/var.

Any `CNN` (ProxylessNAS-Mobile, the digits demo's tiny one) also reads and writes a
plain .npz of its variables (`save_npz`, `load_npz`: numpy arrays, no pickles).
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from flax import traverse_util

# Keras weight name (after "<layer>/", without Keras 2's ":0") -> (collection, our leaf)
_WEIGHTS = {
    "kernel": ("params", "kernel"),
    "depthwise_kernel": ("params", "kernel"),
    "bias": ("params", "bias"),
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}
HEAD = "predictions"


class CheckpointMismatchError(ValueError):
  """The file's weights do not fit the model (missing, unexpected or misshapen)."""


def _text(v) -> str:
  return v.decode("utf8") if isinstance(v, bytes) else str(v)


def read_keras_h5(path: str) -> dict[tuple[str, str, str], np.ndarray]:
  """{(collection, layer, leaf): array} of a Keras HDF5 weights file."""
  import h5py  # pylint: disable=g-import-not-at-top  (only this reader needs it)
  out = {}
  with h5py.File(path, "r") as f:
    root = f["model_weights"] if "model_weights" in f else f
    if "layer_names" not in root.attrs:
      raise CheckpointMismatchError(
          f"{path} is not a Keras HDF5 weights file (no 'layer_names' attribute); expected"
          " mobilenet_v2_weights_tf_dim_ordering_tf_kernels_<width>_224.h5 from"
          " keras-applications")
    for layer in map(_text, root.attrs["layer_names"]):
      group = root[layer]
      for weight in map(_text, group.attrs.get("weight_names", [])):
        # Keras 2 (the public files) writes "depthwise_kernel:0", Keras 3 "kernel".
        leaf = weight.split("/")[-1].split(":")[0]
        if leaf not in _WEIGHTS:
          raise CheckpointMismatchError(f"{path}: unknown weight {weight!r} in layer {layer!r}")
        collection, name = _WEIGHTS[leaf]
        value = np.asarray(group[weight])
        if layer.endswith("_depthwise") and value.ndim == 4:
          value = np.transpose(value, (0, 1, 3, 2))
        out[(collection, layer, name)] = value
  return out


def load_keras_h5(path: str, params, batch_stats, *, keep_head: Optional[bool] = None):
  """(params, batch_stats) of a MobileNetV2 `CNN` with the file's values in place.

  Args:
    path: a Keras MobileNetV2 `.h5` (with or without the classifier).
    params, batch_stats: the model's initialized trees (they give the expected shapes).
    keep_head: take the file's classifier. None (default): when its shape fits (1000
      classes); False: always keep the model's (fine-tuning to new classes).
  Raises:
    CheckpointMismatchError: listing missing and unexpected weights with their shapes,
      e.g. for a file of another width.
  """
  return merge(read_keras_h5(path), params, batch_stats, keep_head=keep_head, source=path,
               hint="is it the same width?")


def save_npz(path: str, params, batch_stats):
  """Writes a `CNN`'s variables as a .npz: "params/<layer>/<leaf>", "batch_stats/..." arrays.

  The layout of experiments/assets/cnn_demo_digits.npz, which `load_npz` reads; weights
  converted from another framework (ProxylessNAS-Mobile's PyTorch release, say) can be
  written in it too, with the layer names of `razor_jax.models.mobilenet.CNN`.
  """
  flat = {}
  for collection, tree in (("params", params), ("batch_stats", batch_stats)):
    for key, value in traverse_util.flatten_dict(tree).items():
      flat["/".join((collection,) + key)] = np.asarray(value)
  np.savez(path, **flat)


def read_npz(path: str) -> dict[tuple[str, ...], np.ndarray]:
  """{(collection, layer, ..., leaf): array} of a .npz that `save_npz` wrote."""
  with np.load(path, allow_pickle=False) as f:
    weights = {tuple(name.split("/")): f[name] for name in f.files}
  if not weights or any(k[0] not in ("params", "batch_stats") for k in weights):
    raise CheckpointMismatchError(
        f"{path} is not a CNN .npz: expected arrays named params/<layer>/<leaf> and"
        " batch_stats/<layer>/<leaf> (razor_jax.models.mobilenet_checkpoint.save_npz)")
  return weights


def load_npz(path: str, params, batch_stats, *, keep_head: Optional[bool] = None):
  """(params, batch_stats) of a `CNN` from a .npz of `save_npz`; keep_head as load_keras_h5."""
  return merge(read_npz(path), params, batch_stats, keep_head=keep_head, source=path,
               hint="is it the same architecture?")


def _is_new_module(key: tuple) -> bool:
  # TinyTL's lite residual branches are added for fine-tuning: a pretrained file may lack
  # them, and then they keep their initialization.
  return "lite_residual" in key[1]


def merge(weights: dict, params, batch_stats, *, keep_head: Optional[bool] = None,
          source: str = "the checkpoint", hint: str = ""):
  """(params, batch_stats) with `weights` ({(collection, layer, ..., leaf): array}) in place.

  The classifier ("predictions") follows `keep_head` (see load_keras_h5); a file without
  it, or without lite residual branches, leaves the model's own.
  """
  trees = {"params": traverse_util.flatten_dict(params),
           "batch_stats": traverse_util.flatten_dict(batch_stats)}
  expected = {(c,) + k: v for c, t in trees.items() for k, v in t.items()}
  head_in_file = any(k[1] == HEAD for k in weights)
  missing = [k for k in expected if k not in weights and not (k[1] == HEAD and not head_in_file)
             and not _is_new_module(k)]
  unexpected = [k for k in weights if k not in expected]
  misshapen = [(k, weights[k].shape, expected[k].shape) for k in weights
               if k in expected and k[1] != HEAD and weights[k].shape != tuple(expected[k].shape)]
  if missing or unexpected or misshapen:
    lines = [f"{source} does not fit this model" + (f" ({hint})" if hint else "") + ":"]
    lines += [f"  missing {'/'.join(k)} {tuple(expected[k].shape)}" for k in missing[:20]]
    lines += [f"  unexpected {'/'.join(k)} {weights[k].shape}" for k in unexpected[:20]]
    lines += [f"  {'/'.join(k)}: file {a} vs model {b}" for k, a, b in misshapen[:20]]
    raise CheckpointMismatchError("\n".join(lines))
  head_fits = all(weights[k].shape == tuple(expected[k].shape)
                  for k in weights if k[1] == HEAD)
  if keep_head and head_in_file and not head_fits:
    raise CheckpointMismatchError(
        f"keep_head=True but the file's classifier does not fit the model's"
        f" {[tuple(expected[k].shape) for k in expected if k[1] == HEAD]}; pass keep_head=False")
  take_head = head_in_file and head_fits and keep_head is not False
  new = {c: dict(t) for c, t in trees.items()}
  for (collection, *key), value in weights.items():
    if key[0] == HEAD and not take_head:
      continue
    old = new[collection][tuple(key)]
    new[collection][tuple(key)] = np.asarray(value, dtype=old.dtype)
  return (traverse_util.unflatten_dict(new["params"]),
          traverse_util.unflatten_dict(new["batch_stats"]))
