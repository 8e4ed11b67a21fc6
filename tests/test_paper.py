"""Policy.paper: the ViT's gradients are the original code's, checked against the
independent plain-jnp model of tests/paper_reference.py."""
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from razor_jax import Policy, packed
from razor_jax.models import vit
import paper_reference
from vit_reference import TINY, loss_fn, make_images, reference_params, stack_blocks

DEMO_CHECKPOINT = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "assets",
                               "vit_demo_digits.npz")
DEMO_SIZES = dict(patch_size=4, hidden_size=64, mlp_dim=128, num_heads=4, num_layers=4)


def _reference_grads(params, images, labels, ratio, sizes):
  def loss(p):
    logits = paper_reference.vit_logits(p, images, ratio, sizes["num_heads"],
                                        sizes["patch_size"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return jax.jit(jax.grad(loss))(params)


def _grads(model, images, labels, params):
  return jax.jit(jax.grad(loss_fn(model, images, labels)))(params)


def _relative_errors(grads, expected):
  """Per parameter, |g - g_ref| / |g_ref|, where g_ref is not negligible.

  The key bias's exact gradient is zero (softmax ignores a shift shared by all keys),
  so both hold rounding noise only; gradients under 1e-6 of the largest are skipped.
  """
  flat = jax.tree_util.tree_flatten_with_path(grads)[0]
  ref = {k: np.asarray(v, np.float64)
         for k, v in jax.tree_util.tree_flatten_with_path(expected)[0]}
  floor = 1e-6 * max(np.linalg.norm(e) for e in ref.values())
  out = {}
  for path, g in flat:
    e = ref[path]
    if np.linalg.norm(e) > floor:
      out[jax.tree_util.keystr(path)] = (np.linalg.norm(np.asarray(g, np.float64) - e)
                                         / np.linalg.norm(e))
  return out


def _digits_batch(n=16):
  """Real handwritten digits (scikit-learn's), 32x32 RGB in [-1, 1], labels mod 5."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = np.kron(digits.images[:n] / 8.0 - 1.0, np.ones((4, 4)))[..., None].repeat(3, -1)
  return jnp.asarray(images, jnp.float32), jnp.asarray(digits.target[:n] % 5)


def test_prune_reference_is_the_original_rule():
  x = jnp.array([[3.0, -1.0, 0.5, -0.5, 2.0, 0.5, 0.1, 0.0, 0.0, 0.0]])
  # n = 10, ratio 0.6: num_small = 6, the 6th smallest |a| is 0.5: every |a| >= 0.5 kept,
  # the three tied 0.5s included (6 kept, not 4).
  got = packed.prune_reference(x, 0.6, value_format="float32", keep_rule="threshold")
  np.testing.assert_array_equal(got, [[3.0, -1.0, 0.5, -0.5, 2.0, 0.5, 0, 0, 0, 0]])
  np.testing.assert_array_equal(paper_reference.prune(x, 0.6, jnp.float32), got)
  # More zeros than num_small: the threshold is 0 and everything is kept.
  zeros = jnp.zeros((1, 10)).at[0, 0].set(1.0)
  np.testing.assert_array_equal(
      packed.unpack(packed.pack(zeros, 0.5, keep_rule="threshold", value_format="float16")),
      zeros)


@pytest.mark.parametrize("scan", [True])  # the unrolled layout: the demo test below
def test_paper_preset_matches_the_independent_reference(scan):
  _, params = reference_params()
  images, labels = make_images(4), jnp.array([1, 2, 3, 4])
  expected = _reference_grads(params, images, labels, 0.9, TINY)
  model = vit.ViT(10, scan=scan, policy=Policy.paper(0.9), **TINY)
  grads = _grads(model, images, labels, stack_blocks(params, 2) if scan else params)
  if scan:
    expected = stack_blocks(expected, 2)
  errors = _relative_errors(grads, expected)
  assert max(errors.values()) < 1e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]
  # And it is not the default rule (fused LayerNorm, exact K): that one differs a lot.
  default = _grads(vit.ViT(10, scan=scan, policy=Policy(0.9, granularity="sample"), **TINY),
                   images, labels, stack_blocks(params, 2) if scan else params)
  assert max(_relative_errors(default, expected).values()) > 0.1


def test_paper_preset_at_zero_is_exact():
  _, params = reference_params()
  images, labels = make_images(4), jnp.array([1, 2, 3, 4])
  assert Policy.paper(0.0).exact
  exact = _grads(vit.ViT(10, scan=False, prune_ratio=0.0, **TINY), images, labels, params)
  grads = _grads(vit.ViT(10, scan=False, policy=Policy.paper(0.0), **TINY), images, labels,
                 params)
  chex.assert_trees_all_equal(grads, exact)
  reference = _reference_grads(params, images, labels, 0.0, TINY)
  assert max(_relative_errors(grads, reference).values()) < 1e-4


@pytest.mark.slow
def test_paper_preset_matches_the_reference_on_the_demo_checkpoint():
  model = vit.ViT(5, scan=False, policy=Policy.paper(0.9), **DEMO_SIZES)
  init = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3))))
  params = vit.load_pretrained(DEMO_CHECKPOINT, init["params"], keep_head=True)
  images, labels = _digits_batch()
  expected = _reference_grads(params, images, labels, 0.9, DEMO_SIZES)
  grads = _grads(model, images, labels, params)
  errors = _relative_errors(grads, expected)
  assert max(errors.values()) < 1e-2, sorted(errors.items(), key=lambda kv: -kv[1])[:5]


def test_paper_preset_fields_and_errors():
  policy = Policy.paper(0.9)
  assert policy.spec("dense").value_format == "float16"
  assert policy.spec("layer_norm").value_format == "float32"
  assert policy.spec("attention").keep_rule == "threshold"
  assert policy.gelu == "float16" and policy.layer_norm_mode == "separate"
  assert Policy.paper(0.9, estimator="energy").spec("dense").estimator == "energy"
  with pytest.raises(ValueError, match="granularity='sample'"):
    Policy(0.9, granularity="token", keep_rule="threshold")
  with pytest.raises(ValueError, match="layer_norm_mode"):
    Policy(0.9, layer_norm_mode="both")
  with pytest.raises(ValueError, match="estimator"):
    Policy(0.9, estimator="unbiased")
  with pytest.raises(ValueError, match="value_formats"):
    Policy(0.9, value_formats=(("gelu", "float32"),))


def test_paper_preset_from_the_command_line():
  from razor_jax.train import cli, setup  # pylint: disable=g-import-not-at-top
  configs = os.path.join(os.path.dirname(__file__), os.pardir, "experiments", "configs")
  config, _ = cli.parse(["--config", "demo", "--config.policy.preset=paper",
                         "--config.prune_ratio=0.8", "--workdir", "unused"], configs)
  assert setup.make_policy(config) == Policy.paper(0.8)
  config, _ = cli.parse(["--config", "demo", "--config.policy.estimator=energy",
                         "--workdir", "unused"], configs)
  assert setup.make_policy(config) == Policy(0.8, estimator="energy")  # the demo: the default
  config, _ = cli.parse(["--config", "demo", "--config.prune_ratio=0.8",
                         "--config.policy.value_format=sign",
                         "--config.policy.value_formats=attention:log4", "--workdir", "unused"],
                        configs)
  assert setup.make_policy(config) == Policy(0.8, value_format="sign",
                                             value_formats=(("attention", "log4"),))
  assert setup.make_policy(config).spec("attention").value_format == "log4"
  assert setup.make_policy(config).spec("dense").value_format == "sign"
  # The attention probabilities set apart: their own ratio and format.
  config, _ = cli.parse(["--config", "demo", "--config.prune_ratio=0.8",
                         "--config.policy.softmax=0.7", "--config.policy.value_format=sign",
                         "--config.policy.value_formats=softmax:log4", "--workdir", "unused"],
                        configs)
  policy = setup.make_policy(config)
  assert (policy.ratio("attention"), policy.ratio("softmax")) == (0.8, 0.7)
  assert [policy.spec(t).value_format for t in ("attention", "softmax")] == ["sign", "log4"]
  for bad, match in (("attention=log4", "op:format"), ("gelu:log4", "unknown op type 'gelu'"),
                     ("attention:log3", "value_format must be one of")):
    config, _ = cli.parse(["--config", "demo", f"--config.policy.value_formats={bad}",
                           "--workdir", "unused"], configs)
    with pytest.raises(ValueError, match=match):
      setup.make_policy(config)
  config, _ = cli.parse(["--config", "demo", "--config.policy.preset=original",
                         "--workdir", "unused"], configs)
  with pytest.raises(ValueError, match="preset must be one of"):
    setup.make_policy(config)


def test_razorize_with_the_paper_preset_matches_the_reference_ops():
  """A plain flax LayerNorm -> Dense -> Dense under razorize(policy=Policy.paper(0.9))."""
  import flax.linen as nn  # pylint: disable=g-import-not-at-top
  from razor_jax import razorize  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(24, name="fc1")(nn.LayerNorm(epsilon=1e-6, name="norm")(x))
      return nn.Dense(16, name="fc2")(jnp.tanh(h))

  x = jax.random.normal(jax.random.key(0), (3, 7, 16)) * jnp.linspace(0.5, 2.0, 16)
  params = Block().init(jax.random.key(1), x)["params"]

  def loss(p):
    with razorize(policy=Policy.paper(0.9)):
      return jnp.sum(jnp.sin(Block().apply({"params": p}, x)))

  def reference(p):
    r = paper_reference
    y = r.layer_norm(x, p["norm"]["scale"], p["norm"]["bias"], 0.9)
    h = jnp.tanh(r.linear(y, p["fc1"]["kernel"], p["fc1"]["bias"], 0.9))
    return jnp.sum(jnp.sin(r.linear(h, p["fc2"]["kernel"], p["fc2"]["bias"], 0.9)))

  errors = _relative_errors(jax.grad(loss)(params), jax.grad(reference)(params))
  assert max(errors.values()) < 1e-2, errors
