"""The one knob: a prune ratio or a Policy, what "exact" means, GELU's storage."""
import pytest

from razor_jax.policy import DEFAULT_PRUNE_RATIO, OP_TYPES, Policy, resolve


def test_exact_is_said_one_way_ratio_zero():
  for policy in (Policy(0.0), Policy.make(0.0), resolve(0.0), resolve(prune_ratio=0)):
    assert policy.exact and policy.gelu is None, policy
    assert all(policy.spec(op_type) is None for op_type in OP_TYPES)
  # An op type pruned, or GELU's storage asked for, is not exact.
  assert not Policy.make(0.0, attention=0.5).exact
  assert not Policy(0.0, gelu_storage="uint8").exact


def test_gelu_storage_auto_follows_pruning():
  assert Policy(0.9).gelu == "uint2"
  assert Policy.make(0.0, attention=0.9).gelu == "uint2"
  assert Policy.make(0.9, attention=0.0).gelu == "uint2"
  assert Policy(0.9, gelu_storage="uint4").gelu == "uint4"
  assert Policy(0.0, gelu_storage="bfloat16").gelu == "bfloat16"
  assert Policy(0.9, gelu_storage=None).gelu is None
  with pytest.raises(ValueError, match=r"gelu_storage must be one of \('auto', 'uint8', "
                                       r"'uint4', 'uint2', 'bfloat16', 'float16'\) or None"):
    Policy(0.9, gelu_storage="int4")


def test_resolve_defaults_to_the_measured_policy_and_takes_one_knob():
  assert DEFAULT_PRUNE_RATIO == 0.8
  assert resolve() == Policy(0.8) == resolve(0.8) == Policy()
  assert resolve(0.9) == Policy(0.9)
  assert resolve("0.5").prune_ratio == 0.5  # a number in text, as a config may hold it
  policy = Policy.make(0.8, attention=0.0, granularity="token")
  assert resolve(policy=policy) is policy
  with pytest.raises(ValueError, match=r"got both prune_ratio=0.8 and policy=.*; pass one"):
    resolve(0.8, policy)
  with pytest.raises(ValueError, match="policy must be a razor_jax.Policy or None, got float"):
    resolve(policy=0.8)
  with pytest.raises(ValueError, match=r"prune_ratio must be in \[0, 1\)"):
    resolve(1.0)


def test_per_op_ratios_and_their_errors():
  policy = Policy.make(0.9, attention=0.0, layer_norm=0.5)
  # "softmax" (the attention probabilities) follows "attention" unless set itself.
  assert [policy.ratio(t) for t in OP_TYPES] == [0.9, 0.0, 0.0, 0.5, 0.9]
  assert policy.spec("attention") is None and policy.spec("layer_norm").prune_ratio == 0.5
  own = Policy.make(0.8, softmax=0.9, value_format="sign",
                    value_formats=(("attention", "log4"), ("softmax", "int8")))
  assert (own.ratio("attention"), own.ratio("softmax")) == (0.8, 0.9)
  assert [own.spec(t).value_format for t in ("dense", "attention", "softmax")] == [
      "sign", "log4", "int8"]
  follows = Policy(0.8, value_formats=(("attention", "sign"),))
  assert follows.spec("softmax").value_format == "sign"
  # A format without the sign fits the probabilities only.
  assert Policy(0.8, value_formats=(("softmax", "ulog3"),)).spec("softmax").value_format == "ulog3"
  for bad in (dict(value_format="ulog3"), dict(value_formats=(("attention", "ulog3"),))):
    with pytest.raises(ValueError, match="'ulog3' drops the sign, so it fits only the attention"):
      Policy(0.8, **bad)
  with pytest.raises(ValueError, match="unknown op type 'mlp' in a policy"):
    Policy.make(0.9, ratios={"mlp": 0.5})
  with pytest.raises(ValueError, match=r"prune ratio for 'dense' must be in \[0, 1\)"):
    Policy.make(0.9, dense=1.5)


def test_auto_values_on_token_rows_are_chosen_per_op_type():
  # The default: 1-bit sign values, the attention probabilities in 3 bits (never
  # negative), a convolution's rows in log4; at any ratio.
  for policy in (Policy(), Policy(0.9)):
    formats = {t: policy.spec(t).value_format for t in OP_TYPES}
    assert formats == {"dense": "sign", "attention": "sign", "softmax": "ulog3",
                       "layer_norm": "sign", "conv": "log4"}, formats
  # Below 0.8 one magnitude per row stands for too many kept values: log4 levels.
  assert [Policy(0.5).spec(t).value_format for t in ("dense", "softmax", "conv")] == [
      "log4", "ulog3", "log4"]
  # An explicit format applies to every op type; a per-op one wins over "auto".
  assert {Policy(value_format="log4").spec(t).value_format for t in OP_TYPES} == {"log4"}
  mixed = Policy(value_formats=(("dense", "log4"),))
  assert (mixed.spec("dense").value_format, mixed.spec("attention").value_format) == (
      "log4", "sign")
  # "softmax" follows an "attention" entry before "auto" resolves it.
  assert Policy(value_formats=(("attention", "log4"),)).spec("softmax").value_format == "log4"
  # Sample groups keep their own "auto" (bfloat16 in 15 bits, resolved by dtype).
  assert Policy(granularity="sample").spec("softmax").value_format == "auto"


def test_token_rows_are_the_default_on_every_backend_and_auto_is_their_old_name():
  from razor_jax import policy as policy_lib
  assert policy_lib.auto_batch_chunk("cpu") == 32 and policy_lib.auto_batch_chunk("gpu") == 0
  # Traced here (CPU), the default is token rows, as on GPU; "auto" (the name configs used
  # when CPU took sample groups) is the same policy, so it hashes and compares equal.
  assert Policy(0.9).spec("dense").granularity == "token"
  assert Policy(0.9, granularity="auto") == Policy(0.9)
  assert Policy(0.9, granularity="sample").spec("dense").granularity == "sample"
  # Formats that only one granularity stores fail for the other, naming it.
  assert Policy(0.9, value_format="log4").spec("dense").value_format == "log4"
  with pytest.raises(ValueError, match="value_format='log4' codes token rows"):
    Policy(0.9, granularity="sample", value_format="log4")
  with pytest.raises(ValueError, match="granularity must be one of"):
    Policy(0.9, granularity="row")
