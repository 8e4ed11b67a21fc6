"""MobileNetV2 and ProxylessNAS-Mobile: sizes, training methods, Keras weights."""
import h5py
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from razor_jax.models import mobilenet, mobilenet_checkpoint
from razor_jax.policy import Policy

# Parameters without BatchNorm running statistics, 1000 classes, 224 px.
PARAM_COUNTS = {
    ("mobilenet_v2", 1.0): 3_504_872,  # Keras / torchvision's mobilenet_v2
    ("mobilenet_v2", 0.35): 1_677_128,
    ("mobilenet_v2", 1.4): 6_108_776,
    ("proxyless_mobile", 1.0): 4_080_512,  # pytorchcv's proxylessnas_mobile
}


@pytest.mark.parametrize("arch,width", sorted(PARAM_COUNTS))
def test_param_counts(arch, width):
  model = mobilenet.CNN(arch=arch, width=width)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  assert mobilenet.param_count(variables["params"]) == PARAM_COUNTS[(arch, width)]
  if arch == "mobilenet_v2" and width == 1.0:
    assert variables["params"]["block_16_project"]["kernel"].shape == (1, 1, 960, 320)
    assert variables["params"]["block_3_depthwise"]["kernel"].shape == (3, 3, 1, 144)


def test_bad_fields_are_named():
  with pytest.raises(ValueError, match="batch_norm must be one of"):
    mobilenet.MobileNetV2(batch_norm="eval")
  with pytest.raises(ValueError, match="arch must be one of"):
    mobilenet.CNN(arch="resnet")
  with pytest.raises(ValueError, match="pass no prune_ratio"):
    mobilenet.MobileNetV2(compression="actnn", prune_ratio=0.9)


IMAGE = (4, 16, 16, 3)


def _tiny(**kwargs):
  # The same blocks, layers and methods as the full-size models, compiled in seconds.
  return mobilenet.CNN(arch="tiny", num_classes=10, **kwargs)


@pytest.fixture(scope="module")
def small():
  """The tiny CNN on 16 px, 10 classes, with a random head and batch."""
  model = _tiny(prune_ratio=0.0)
  variables = model.init(jax.random.key(0), jnp.zeros(IMAGE))
  params = dict(variables["params"])
  params["predictions"] = {"kernel": jax.random.normal(jax.random.key(1), (128, 10)) * 0.1,
                           "bias": jnp.zeros(10)}
  images = jax.random.uniform(jax.random.key(2), IMAGE, minval=-1, maxval=1)
  return params, variables["batch_stats"], images


def _grads(model, params, stats, images, train=True):
  def loss(p):
    out, updated = model.apply({"params": p, "batch_stats": stats}, images, train=train,
                               mutable=["batch_stats"])
    return jnp.sum(jax.nn.log_softmax(out)[:, 0]), (out, updated)
  return jax.jit(jax.grad(loss, has_aux=True))(params)


def _flat(tree):
  return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(tree).items()}


@pytest.mark.slow  # compiles the tiny CNN's gradient (20-60 s on 2 cores)
def test_train_mode_batch_norm_updates_running_averages(small):
  params, stats, images = small
  _, (_, updated) = _grads(_tiny(prune_ratio=0.9), params, stats, images)
  bn = updated["batch_stats"]["bn_Conv1"]
  # One step from (0, 1) with momentum 0.9: a tenth of the way to the batch statistics.
  assert not np.allclose(bn["mean"], 0.0) and np.all(np.abs(bn["mean"]) < 1.0)
  assert not np.allclose(bn["var"], 1.0) and np.all(bn["var"] > 0.9)


@pytest.mark.parametrize("batch_norm", ["train", "frozen"])
def test_gpu_policy_traces_every_layer(small, batch_norm):
  # The default granularity, token rows: a feature map's row is an image row, so the
  # 3-channel stem keeps round(0.1 * 16 * 3) = 5 per row (per-pixel rows would keep the
  # floor of one). Traced only; the ops' values are checked in test_conv_ops.
  params, stats, images = small
  model = _tiny(policy=Policy(0.9, granularity="token"), batch_norm=batch_norm)
  loss = lambda p: jnp.sum(model.apply({"params": p, "batch_stats": stats}, images, train=True,
                                       mutable=["batch_stats"])[0])
  grads = jax.eval_shape(jax.grad(loss), params)
  assert jax.tree.structure(grads) == jax.tree.structure(params)


@pytest.mark.slow  # compiles the tiny CNN's gradient (20-60 s on 2 cores)
def test_methods_same_forward_and_their_gradients(small):
  # BatchNorm frozen, as the paper's CNN runs: with batch statistics over 4 samples, the
  # pruned (or 2-bit) normalized input bends every gradient below it (cosines 0.2-0.6).
  params, stats, images = small
  full_g, (full_out, _) = _grads(_tiny(prune_ratio=0.0, batch_norm="frozen"), params, stats,
                                 images)
  full = _flat(full_g)
  for model in (_tiny(prune_ratio=0.9, batch_norm="frozen"),
                _tiny(compression="actnn", batch_norm="frozen")):
    g, (out, _) = _grads(model, params, stats, images)
    np.testing.assert_allclose(out, full_out, rtol=1e-5, atol=1e-5)
    g = _flat(g)
    for k in ("block_3_expand/kernel", "block_2_depthwise/kernel", "predictions/kernel"):
      # Approximate, not equal, and pointing the same way (measured: 0.79-0.97).
      assert not np.allclose(g[k], full[k])
      cos = np.dot(g[k].ravel(), full[k].ravel()) / (
          np.linalg.norm(g[k]) * np.linalg.norm(full[k]))
      assert cos > 0.7, (model.compression, k, cos)


@pytest.mark.slow  # compiles the tiny CNN's gradient (20-60 s on 2 cores)
def test_tinytl_trains_biases_and_lite_residuals_only(small):
  params, stats, images = small
  g, _ = _grads(_tiny(finetune="biases"),
                params, stats, images)
  g = _flat(g)
  assert not np.any(g["block_2_expand/kernel"]) and not np.any(g["block_2_expand_BN/scale"])
  assert np.any(g["block_2_expand_BN/bias"]) and np.any(g["predictions/kernel"])
  lite = _tiny(finetune="lite_residual+biases")
  v = lite.init(jax.random.key(0), jnp.zeros(IMAGE))
  assert "block_2_lite_residual" in v["params"]
  lite_params = {**v["params"], **{k: params[k] for k in params}}
  g, _ = _grads(lite, lite_params, v["batch_stats"], images)
  g = _flat(g)
  assert np.any(g["block_2_lite_residual/final_bn/scale"])
  assert not np.any(g["block_2_depthwise/kernel"])


@pytest.mark.slow  # compiles the tiny CNN's gradient (20-60 s on 2 cores)
def test_fixed_batch_norm_gets_no_gradient(small):
  params, stats, images = small
  g, _ = _grads(_tiny(batch_norm="fixed"),
                params, stats, images)
  g = _flat(g)
  assert not np.any(g["bn_Conv1/scale"]) and not np.any(g["bn_Conv1/bias"])
  assert np.any(g["Conv1/kernel"])


# ----------------------------------------------------------------- Keras weights

def _write_keras2_h5(path, params, stats, drop=(), head=True):
  """A file in the layout of keras-applications' mobilenet_v2_*.h5 (Keras 2, ':0' names)."""
  rng = np.random.default_rng(0)
  written = {}
  with h5py.File(path, "w") as f:
    names = []
    for layer, p in params.items():
      if layer in drop or (layer == "predictions" and not head):
        continue
      names.append(layer)
      g = f.create_group(layer)
      if "kernel" in p:
        shape = p["kernel"].shape
        if layer.endswith("_depthwise"):
          weights = {"depthwise_kernel:0": (shape[0], shape[1], shape[3], 1)}
        else:
          weights = {"kernel:0": shape}
        if "bias" in p:
          weights["bias:0"] = p["bias"].shape
      else:
        c = p["scale"].shape
        weights = {"gamma:0": c, "beta:0": c, "moving_mean:0": c, "moving_variance:0": c}
      full = [f"{layer}/{w}" for w in weights]
      g.attrs["weight_names"] = [n.encode() for n in full]
      for name, (w, shape) in zip(full, weights.items()):
        value = rng.normal(size=shape).astype(np.float32)
        g.create_dataset(name, data=value)
        written[(layer, w)] = value
    f.attrs["layer_names"] = [n.encode() for n in ["input_1"] + names]
    f.attrs["keras_version"] = b"2.2.4"
    f.attrs["backend"] = b"tensorflow"
    f.create_group("input_1").attrs["weight_names"] = []
  return written


def test_load_keras_h5(tmp_path):
  model = mobilenet.MobileNetV2(0.35)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
  params, stats = zeros(v["params"]), zeros(v["batch_stats"])
  path = str(tmp_path / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224.h5")
  written = _write_keras2_h5(path, params, stats)
  p, s = mobilenet_checkpoint.load_keras_h5(path, params, stats)
  np.testing.assert_array_equal(p["Conv1"]["kernel"], written[("Conv1", "kernel:0")])
  dw = written[("block_4_depthwise", "depthwise_kernel:0")]
  np.testing.assert_array_equal(p["block_4_depthwise"]["kernel"], np.transpose(dw, (0, 1, 3, 2)))
  np.testing.assert_array_equal(p["block_4_depthwise_BN"]["scale"],
                                written[("block_4_depthwise_BN", "gamma:0")])
  np.testing.assert_array_equal(s["block_4_depthwise_BN"]["var"],
                                written[("block_4_depthwise_BN", "moving_variance:0")])
  np.testing.assert_array_equal(p["predictions"]["bias"], written[("predictions", "bias:0")])
  # A 10-class model keeps its own head.
  small = mobilenet.MobileNetV2(0.35, num_classes=10)
  v10 = jax.eval_shape(lambda: small.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  p10, _ = mobilenet_checkpoint.load_keras_h5(path, zeros(v10["params"]),
                                              zeros(v10["batch_stats"]))
  assert not np.any(p10["predictions"]["kernel"])
  np.testing.assert_array_equal(p10["Conv1"]["kernel"], written[("Conv1", "kernel:0")])


def test_load_keras_h5_errors(tmp_path):
  model = mobilenet.MobileNetV2(0.35)
  v = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  zeros = lambda t: jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), t)
  params, stats = zeros(v["params"]), zeros(v["batch_stats"])
  path = str(tmp_path / "partial.h5")
  _write_keras2_h5(path, params, stats, drop=("block_7_project",))
  with pytest.raises(mobilenet_checkpoint.CheckpointMismatchError,
                     match=r"missing params/block_7_project/kernel \(1, 1, 144, 24\)"):
    mobilenet_checkpoint.load_keras_h5(path, params, stats)
  wide = mobilenet.MobileNetV2(1.0)
  vw = jax.eval_shape(lambda: wide.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3))))
  with pytest.raises(mobilenet_checkpoint.CheckpointMismatchError, match="same width"):
    mobilenet_checkpoint.load_keras_h5(path, zeros(vw["params"]), zeros(vw["batch_stats"]))
  bad = str(tmp_path / "not_keras.h5")
  with h5py.File(bad, "w") as f:
    f.create_dataset("x", data=np.zeros(3))
  with pytest.raises(mobilenet_checkpoint.CheckpointMismatchError, match="not a Keras HDF5"):
    mobilenet_checkpoint.load_keras_h5(bad, params, stats)
