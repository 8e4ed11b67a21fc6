"""Public ViT checkpoints (.npz of google-research/vision_transformer): load, export, errors."""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from razor_jax.models import vit
from razor_jax.models.vit_checkpoint import CheckpointMismatchError
from vit_reference import TINY, make_images, reference_params, stack_blocks

# ViT-B_16.npz of gs://vit_models/imagenet21k/ (google-research/vision_transformer), as
# published: every array's name and shape. Inside a block the names are pre-linen (one
# counter over LayerNorm, attention, LayerNorm, MLP); the ImageNet-21k head and the
# pre_logits layer are there too.
VIT_B16 = {
    "cls": (1, 1, 768),
    "embedding/kernel": (16, 16, 3, 768),
    "embedding/bias": (768,),
    "Transformer/posembed_input/pos_embedding": (1, 197, 768),
    "Transformer/encoder_norm/scale": (768,),
    "Transformer/encoder_norm/bias": (768,),
    "pre_logits/kernel": (768, 768),
    "pre_logits/bias": (768,),
    "head/kernel": (768, 21843),
    "head/bias": (21843,),
}
VIT_B16_BLOCK = {  # under Transformer/encoderblock_{i}/ for i = 0 .. 11
    "LayerNorm_0/scale": (768,),
    "LayerNorm_0/bias": (768,),
    "MultiHeadDotProductAttention_1/query/kernel": (768, 12, 64),
    "MultiHeadDotProductAttention_1/query/bias": (12, 64),
    "MultiHeadDotProductAttention_1/key/kernel": (768, 12, 64),
    "MultiHeadDotProductAttention_1/key/bias": (12, 64),
    "MultiHeadDotProductAttention_1/value/kernel": (768, 12, 64),
    "MultiHeadDotProductAttention_1/value/bias": (12, 64),
    "MultiHeadDotProductAttention_1/out/kernel": (12, 64, 768),
    "MultiHeadDotProductAttention_1/out/bias": (768,),
    "LayerNorm_2/scale": (768,),
    "LayerNorm_2/bias": (768,),
    "MlpBlock_3/Dense_0/kernel": (768, 3072),
    "MlpBlock_3/Dense_0/bias": (3072,),
    "MlpBlock_3/Dense_1/kernel": (3072, 768),
    "MlpBlock_3/Dense_1/bias": (768,),
}
VIT_B16.update({f"Transformer/encoderblock_{i}/{name}": shape
                for i in range(12) for name, shape in VIT_B16_BLOCK.items()})


@pytest.fixture(scope="module")
def public_b16(tmp_path_factory):
  """(path, {name: value}): a file with ViT-B_16.npz's names and shapes, each array filled
  with its own value, so where an array lands shows which name it was read from."""
  path = tmp_path_factory.mktemp("public") / "ViT-B_16.npz"
  ids = {name: float(i + 1) for i, name in enumerate(VIT_B16)}
  np.savez_compressed(path, **{name: np.full(shape, ids[name], np.float32)
                               for name, shape in VIT_B16.items()})
  return str(path), ids


def _values(tree) -> list:
  """The one value of each (layer of each) leaf; raises if a leaf is not constant."""
  out = []
  for path, leaf in traverse_util.flatten_dict(dict(tree), sep="/").items():
    layers = leaf if path.startswith("Transformer/encoderblock/") else [leaf]
    for layer in layers:
      assert np.min(layer) == np.max(layer), path
      out.append(float(np.min(layer)))
  return out


@pytest.mark.slow
def test_public_vit_b16_layout_loads(public_b16):
  path, ids = public_b16
  model = vit.ViT(21843, variant="B/16", representation_size=768)
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 224, 224, 3)))["params"])
  params = vit.load_pretrained(path, init)
  chex.assert_trees_all_equal_shapes_and_dtypes(params, init)
  # Every published array lands in exactly one place.
  assert sorted(_values(params)) == sorted(ids.values())
  blocks = params["Transformer"]["encoderblock"]  # scanned: a leading layer axis
  for linen, published in [
      ("MultiHeadDotProductAttention_0/query/kernel",
       "MultiHeadDotProductAttention_1/query/kernel"),
      ("MultiHeadDotProductAttention_0/out/bias", "MultiHeadDotProductAttention_1/out/bias"),
      ("LayerNorm_0/scale", "LayerNorm_0/scale"),
      ("LayerNorm_1/bias", "LayerNorm_2/bias"),
      ("MlpBlock_0/Dense_1/kernel", "MlpBlock_3/Dense_1/kernel")]:
    leaf = traverse_util.flatten_dict(blocks, sep="/")[linen]
    for i in (0, 5, 11):
      assert np.all(leaf[i] == ids[f"Transformer/encoderblock_{i}/{published}"]), (linen, i)
  assert np.all(params["head"]["kernel"] == ids["head/kernel"])
  assert np.all(params["pre_logits"]["bias"] == ids["pre_logits/bias"])


@pytest.mark.slow
def test_public_vit_b16_for_fine_tuning_at_384(public_b16):
  """A new task: a new head, no pre_logits, position embeddings resampled to 24x24."""
  path, ids = public_b16
  model = vit.ViT(200, variant="B/16", scan=False)
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0),
                                           jnp.zeros((1, 384, 384, 3)))["params"])
  params = vit.load_pretrained(path, init)
  assert "pre_logits" not in params and not np.any(params["head"]["kernel"])
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert posemb.shape == (1, 577, 768)
  assert np.allclose(posemb, ids["Transformer/posembed_input/pos_embedding"])
  query = params["Transformer"]["encoderblock_7"]["MultiHeadDotProductAttention_0"]["query"]
  assert np.all(query["kernel"] == ids[
      "Transformer/encoderblock_7/MultiHeadDotProductAttention_1/query/kernel"])


# The published block layout: one counter over a block's modules in call order.
_PRE_LINEN = {"LayerNorm_1": "LayerNorm_2", "MultiHeadDotProductAttention_0":
              "MultiHeadDotProductAttention_1", "MlpBlock_0": "MlpBlock_3"}


def _public_npz(params, path):
  """Writes params as the public files are written: flat keys, pre-linen block names."""
  flat = {}
  for key, value in traverse_util.flatten_dict(params, sep="/").items():
    parts = key.split("/")
    if len(parts) > 2 and parts[1].startswith("encoderblock_"):
      parts[2] = _PRE_LINEN.get(parts[2], parts[2])
    flat["/".join(parts)] = np.asarray(value)
  np.savez(path, **flat)
  return flat


@pytest.mark.parametrize("scan", [True, False])
def test_load_public_npz_gives_the_reference_model(tmp_path, scan):
  ref, ref_params = reference_params()
  flat = _public_npz(ref_params, tmp_path / "ViT-tiny.npz")
  assert "Transformer/encoderblock_0/MlpBlock_3/Dense_0/kernel" in flat
  model = vit.ViT(10, scan=scan, **TINY)
  init = model.init(jax.random.PRNGKey(5), make_images())["params"]
  params = vit.load_pretrained(str(tmp_path / "ViT-tiny.npz"), init)
  chex.assert_trees_all_equal(params, stack_blocks(ref_params, 2) if scan else ref_params)
  chex.assert_trees_all_close(model.apply({"params": params}, make_images()),
                              ref.apply({"params": ref_params}, make_images()), atol=2e-6)


def test_load_replaces_head_drops_pre_logits_and_resamples_posemb(tmp_path):
  ref, ref_params = reference_params(num_classes=21, representation_size=24)
  _public_npz(ref_params, tmp_path / "ckpt.npz")
  model = vit.ViT(5, **TINY)  # 5 classes, no pre_logits, 32 px images: 8x8 grid
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), make_images(size=32)))["params"]
  params = vit.load_pretrained(str(tmp_path / "ckpt.npz"), init)
  assert "pre_logits" not in params
  np.testing.assert_array_equal(params["head"]["kernel"], np.zeros((32, 5)))
  posemb = params["Transformer"]["posembed_input"]["pos_embedding"]
  assert posemb.shape == (1, 65, 32)
  old = np.asarray(ref_params["Transformer"]["posembed_input"]["pos_embedding"])
  np.testing.assert_array_equal(posemb[0, 0], old[0, 0])  # the cls position is kept
  np.testing.assert_array_equal(posemb[0, 1], old[0, 1])  # corners survive bilinear zoom
  assert np.isfinite(model.apply({"params": params}, make_images(size=32))).all()


def test_load_mismatch_lists_missing_and_unexpected_keys(tmp_path):
  _, ref_params = reference_params()
  flat = _public_npz(ref_params, tmp_path / "ckpt.npz")
  del flat["Transformer/encoder_norm/scale"]
  flat["extra/thing"] = np.zeros((2, 3))
  np.savez(tmp_path / "bad.npz", **flat)
  init = vit.ViT(10, **TINY).init(jax.random.PRNGKey(0), make_images())["params"]
  with pytest.raises(CheckpointMismatchError) as e:
    vit.load_pretrained(str(tmp_path / "bad.npz"), init)
  assert "Transformer/encoder_norm/scale (32,)" in str(e.value)
  assert "extra/thing (2, 3)" in str(e.value)
  with pytest.raises(CheckpointMismatchError, match="shape mismatch"):
    vit.load_pretrained(str(tmp_path / "ckpt.npz"),
                        vit.ViT(10, **{**TINY, "mlp_dim": 48}).init(
                            jax.random.PRNGKey(0), make_images())["params"])
  with pytest.raises(FileNotFoundError, match="gs://vit_models"):
    vit.load_pretrained(str(tmp_path / "nope.npz"), init)


def test_export_round_trip_is_exact(tmp_path):
  _, ref_params = reference_params()
  params = stack_blocks(ref_params, 2)
  path = str(tmp_path / "finetuned.npz")
  vit.export(params, path)
  with np.load(path) as npz:
    assert "Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel" in npz.files
    assert "Transformer/encoderblock" not in " ".join(k for k in npz.files if "block/" in k)
  init = vit.ViT(10, **TINY).init(jax.random.PRNGKey(9), make_images())["params"]
  chex.assert_trees_all_equal(vit.load_pretrained(path, init), params)
