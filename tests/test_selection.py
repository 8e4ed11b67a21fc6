"""Top-K selection: the sampled bracket, the threshold search and the kept set."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import layout_reference
from razor_jax import packed, selection


@pytest.mark.parametrize("kind", ["normal", "ties", "zeros", "aliased", "wide", "constant"])
@pytest.mark.parametrize("ratio", [0.5, 0.9, 0.97])
def test_long_groups_exact_whether_the_bracket_holds_or_not(kind, ratio):
  x = layout_reference.long_group(kind, seed=int(ratio * 100))
  k = packed.keep_count(x.shape[1], ratio)
  plan = selection._bracket_plan(x.shape[1], k)
  *_, ok = jax.jit(selection._bracket, static_argnums=(1, 2))(x, k, plan)
  if kind in ("normal", "wide"):
    assert ok
  elif kind in ("aliased", "constant") or (kind == "zeros" and ratio < 0.97):
    assert not ok  # so the whole-group search runs
  # Exactly the K largest, ties to the lowest positions: what a sort keeps.
  words = jax.jit(selection.topk_words, static_argnums=1)(x, k)
  np.testing.assert_array_equal(layout_reference.bitmask_to_mask(words, x.shape[1]),
                                selection.mask_reference(x, k))
  # The bracketed search and the whole-group search agree on threshold and tie cut.
  bracketed = jax.jit(selection.threshold, static_argnums=1)(x, k)
  for got, want in zip(bracketed, jax.jit(selection.threshold_full, static_argnums=1)(x, k)):
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("kind", ["normal", "gelu", "softmax", "outliers", "bfloat16", "cauchy"])
def test_sampled_bracket_holds_on_typical_activations(kind):
  # The fallback (a search over the whole group) is exact but 4x slower: the bracket
  # and the candidate capacity must hold for activation-like data with room to spare.
  key = jax.random.PRNGKey(7)
  x = {"normal": lambda: jax.random.normal(key, (4, 197 * 768)),
       "gelu": lambda: jax.nn.gelu(jax.random.normal(key, (4, 197 * 768))),
       "softmax": lambda: jax.nn.softmax(3 * jax.random.normal(key, (4, 12 * 197, 197))),
       "outliers": lambda: jax.random.normal(key, (4, 197, 768)) * jnp.where(
           jnp.arange(768) % 97 == 0, 30.0, 1.0),
       "bfloat16": lambda: jax.random.normal(key, (4, 197 * 768)).astype(jnp.bfloat16),
       "cauchy": lambda: jax.random.cauchy(key, (4, 197 * 768))}[kind]()
  x = x.reshape(x.shape[0], -1)
  for ratio in (0.5, 0.8, 0.9, 0.95, 0.97):
    k = packed.keep_count(x.shape[1], ratio)
    plan = selection._bracket_plan(x.shape[1], k)
    *_, count, ok = jax.jit(selection._bracket, static_argnums=(1, 2))(x, k, plan)
    assert ok, (ratio, count, plan)
    assert int(count.max()) <= 0.9 * plan[-1], (ratio, count, plan)
