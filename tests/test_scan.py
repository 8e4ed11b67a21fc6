"""scan_layers: same values and gradients as lax.scan, backward buffers made late."""
import chex
import jax
import jax.numpy as jnp
import numpy as np

from razor_jax import scan


def _layer(params, x, key):
  h = jnp.tanh(x @ params["w"] + params["b"])
  if key.size:
    h = h * jax.random.bernoulli(jax.random.wrap_key_data(key), 0.9, h.shape)
  return x + h


def _setup(layers=4, width=8):
  ks = jax.random.split(jax.random.PRNGKey(0), 3)
  params = {"w": 0.3 * jax.random.normal(ks[0], (layers, width, width)),
            "b": 0.1 * jax.random.normal(ks[1], (layers, width))}
  return params, jax.random.normal(ks[2], (5, width))


def test_values_and_gradients_match_lax_scan():
  params, x = _setup()
  loss = lambda fn: (lambda p, x: jnp.sum(jnp.sin(fn(_layer, p, x))))
  chex.assert_trees_all_close(scan.scan_layers(_layer, params, x),
                              scan.scan_layers_reference(_layer, params, x))
  got = jax.grad(loss(scan.scan_layers), argnums=(0, 1))(params, x)
  want = jax.grad(loss(scan.scan_layers_reference), argnums=(0, 1))(params, x)
  chex.assert_trees_all_close(got, want, rtol=1e-5, atol=1e-6)


def test_per_layer_inputs_reach_each_layer():
  params, x = _setup()
  keys = jax.random.key_data(jax.random.split(jax.random.PRNGKey(1), 4))
  out = scan.scan_layers(_layer, params, x, keys)
  chex.assert_trees_all_close(out, scan.scan_layers_reference(_layer, params, x, keys))
  assert not np.allclose(out, scan.scan_layers(_layer, params, x))
  grad = jax.grad(lambda p: jnp.sum(scan.scan_layers(_layer, p, x, keys)))(params)
  want = jax.grad(lambda p: jnp.sum(scan.scan_layers_reference(_layer, p, x, keys)))(params)
  chex.assert_trees_all_close(grad, want, rtol=1e-5, atol=1e-6)


def test_mismatched_layer_axes_raise():
  params, x = _setup()
  params["b"] = params["b"][:3]
  try:
    scan.scan_layers(_layer, params, x)
  except ValueError as e:
    assert "leading (layer) axis" in str(e)
  else:
    raise AssertionError("expected a ValueError")
