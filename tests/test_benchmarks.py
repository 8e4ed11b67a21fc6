"""benchmarks/: record format, a real mini run on the demo ViT, rendering, accuracy summary.

The mini run compiles the demo ViT's train step for full fine-tuning and Back Razor@0.9
(batch 64, 32 px), measures one of them in a fresh process, times both in turns and
compares gradients: the numbers must be sane, not exact.
"""
import json
import os

import jax
import numpy as np
import pytest

from benchmarks import accuracy, measure, records, render, suite
from benchmarks.cases import ALL_METHODS, Case, Method, parse_method
from benchmarks.records import Record

FULL, RAZOR = parse_method("full"), parse_method("razor@0.9")


def test_method_labels_round_trip():
  assert [m.label for m in ALL_METHODS] == [
      "full", "remat", "razor@0.8", "razor@0.9", "razor_sample@0.9"]
  for m in ALL_METHODS:
    assert parse_method(m.label) == m
  for bad in ("razor", "razor@1.0", "remat@0.5", "dense"):
    with pytest.raises(ValueError):
      parse_method(bad)


def test_case_config_is_the_trainers():
  config = Case("demo", 8, Method("razor_sample", 0.9)).config()
  assert (config.prune_ratio, config.policy.granularity, config.model.remat) == (0.9, "sample",
                                                                                   False)
  assert Case("demo", 8, RAZOR).config().policy.granularity == "token"
  assert config.optimizer.name == "sgd" and config.optimizer.momentum == 0.9
  assert Case("B/16", 128, parse_method("remat")).config().model.remat


def test_records_have_the_issue_keys_and_round_trip(tmp_path):
  case = Case("L/16", 128, RAZOR)
  record = Record.for_case(case, "cpu", compiled_peak_bytes=10 * 2**30, bits_per_element=2.5,
                           grad_cosine={"a": 0.9, "b": None})
  path = str(tmp_path / "benchmark.json")
  records.save(path, [record])
  with open(path, encoding="utf-8") as f:
    (row,) = json.load(f)
  for key in ("model", "batch", "method", "prune_ratio", "backend", "compiled_peak_bytes",
              "measured_peak_bytes", "step_time_ratio", "bits_per_element", "grad_cosine"):
    assert key in row
  assert (row["model"], row["batch"], row["method"], row["prune_ratio"]) == ("L/16", 128,
                                                                            "razor", 0.9)
  assert row["measured_peak_bytes"] is None and row["step_time_ratio"] is None
  assert records.load(path) == [record]
  with pytest.raises(ValueError, match="measured_peak_bytes"):
    records.check({k: v for k, v in row.items() if k != "measured_peak_bytes"})
  with pytest.raises(ValueError, match="batch"):
    records.check({**row, "batch": "128"})
  newer = Record.for_case(case, "cpu", compiled_peak_bytes=1)
  other = Record.for_case(case, "gpu", compiled_peak_bytes=2)
  merged = sorted(records.merge([record], [newer, other]), key=lambda r: r.backend)
  assert [r.compiled_peak_bytes for r in merged] == [1, 2]
  assert merged[0].bits_per_element == 2.5  # kept: the rerun did not measure it


def test_layer_leaves_split_the_scanned_layer_axis():
  tree = {"Transformer": {"encoderblock": {"w": np.arange(6.0).reshape(3, 2)}},
          "head": {"kernel": np.ones(2)}}
  leaves = measure._layer_leaves(tree)  # pylint: disable=protected-access
  assert sorted(leaves) == ["Transformer/encoderblock_0/w", "Transformer/encoderblock_1/w",
                            "Transformer/encoderblock_2/w", "head/kernel"]
  np.testing.assert_array_equal(leaves["Transformer/encoderblock_2/w"], [4.0, 5.0])
  assert measure.cosine(np.array([1.0, 0.0]), np.array([2.0, 0.0])) == pytest.approx(1.0)
  assert measure.cosine(np.zeros(2), np.ones(2)) is None


@pytest.fixture(scope="module")
def mini_run():
  # Batch 64: below a few MB of temporaries the resident size does not move at all.
  cases = (Case("demo", 64, FULL), Case("demo", 64, RAZOR))
  # The fresh process measures full fine-tuning: it compiles fastest. No shared
  # compilation cache: jax would keep writing to it for the rest of the session.
  plan = suite.Plan(compiled=cases, measured=cases[:1], timed=(cases,), cosine=cases[1:],
                    rounds=1, child_steps=2)
  return {r.label: r for r in suite.run(plan, say=lambda line: None)}


@pytest.mark.slow
def test_mini_run_gives_sane_numbers(mini_run):
  full, razor = mini_run["full"], mini_run["razor@0.9"]
  for r in (full, razor):
    records.check(r.to_json())
    assert r.backend == jax.default_backend() and r.compiled_peak_bytes > 0
  assert razor.compiled_peak_bytes < 0.5 * full.compiled_peak_bytes
  # A real process holds its arguments and temporaries, near XLA's own figure, plus what
  # the runtime allocates for running a step at all (tens of MB).
  assert 0.5 * full.compiled_peak_bytes < full.measured_peak_bytes
  assert full.measured_peak_bytes < 2 * full.compiled_peak_bytes + 64 * 2**20
  assert full.measured_peak_kind in ("rss", "device_peak_bytes_in_use")
  assert razor.measured_peak_bytes is None
  assert full.step_time_ratio == 1.0 and 0.05 < razor.step_time_ratio < 20
  assert full.bits_per_element is None and 1.0 < razor.bits_per_element < 8.0
  cosines = [v for v in razor.grad_cosine.values() if v is not None]
  assert len(cosines) > 20 and all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for c in cosines)
  assert razor.grad_cosine["head/kernel"] == pytest.approx(1.0, abs=1e-4)  # after the encoder
  assert razor.grad_cosine_mean > 0.3
  assert "Transformer/encoderblock_3/MlpBlock_0/Dense_0/kernel" in razor.grad_cosine


def _fake_records():
  rows = []
  for model, batch in (("Ti/16", 1), ("Ti/16", 8), ("L/16", 128), ("B/16", 128)):
    for i, method in enumerate(ALL_METHODS):
      rows.append(Record.for_case(
          Case(model, batch, method), "cpu", compiled_peak_bytes=(10 - i) * batch * 2**20,
          measured_peak_bytes=(11 - i) * batch * 2**20 if batch < 128 else None,
          step_time_ratio=1.0 + 0.1 * i if batch < 128 else None,
          step_time_s=0.1 * (1 + 0.1 * i) if batch < 128 else None,
          bits_per_element=None if method.exact else 2.5,
          grad_cosine=None if method.exact else {"head/kernel": 1.0, "x": 0.5, "kb": None},
          grad_cosine_min=None if method.exact else 0.5,
          grad_cosine_mean=None if method.exact else 0.75))
  rows.append(Record.for_case(Case("L/16", 128, FULL, dtype="bfloat16"), "gpu",
                              measured_peak_bytes=40 * 2**30, step_time_s=0.5,
                              step_time_ratio=1.0, device="NVIDIA H200"))
  return rows


def test_render_writes_tables_and_plots(tmp_path):
  out = str(tmp_path)
  records.save(os.path.join(out, render.BENCHMARK_JSON), _fake_records())
  runs = [{"optimizer": "sgd", "prune_ratio": r, "method": accuracy.method_label(r), "seed": s,
           "total_steps": 500, "lr": 0.03, "top1": 90.0 + s - 10 * r, "eval_examples": 191}
          for r in (0.0, 0.9, 0.95) for s in range(3)]
  accuracy.save(os.path.join(out, render.ACCURACY_JSON), runs,
                {"init_path": os.path.join(out, "ckpt.npz")})
  paths = render.write(out)
  text = open(paths[0], encoding="utf-8").read()
  for needle in ("Table 1", "51257", "12270", "Table 5", "1655", "Table 3", "ViT-L/16",
                 "razor@0.9", "NVIDIA H200", "Transfer accuracy", "91.00 ± 1.00", "-9.00",
                 "(sgd, 500 steps): Back Razor@0.9 82.00 ± 1.00% vs full fine-tuning, gap"
                 " -9.00 points: not within"):
    assert needle in text, needle
  assert "Back Razor@0.95" not in text  # the findings quote 0.9 and its variants only
  for png in paths[1:]:
    with open(png, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(os.path.join(out, render.ACCURACY_JSON), encoding="utf-8") as f:
    assert json.load(f)["base_config"]["init_path"] == "ckpt.npz"  # no machine paths


def test_accuracy_summary_and_run_config():
  runs = [{"optimizer": "adam", "prune_ratio": r, "method": accuracy.method_label(r), "seed": s,
           "total_steps": 10, "top1": t} for r, ts in ((0.9, (89.0, 89.0)), (0.0, (90.0, 92.0)))
          for s, t in enumerate(ts)]
  rows = {row["method"]: row for row in accuracy.summarize(runs)}
  assert rows["full"]["top1_mean"] == 91.0 and rows["full"]["top1_std"] == pytest.approx(2**0.5)
  assert rows["razor@0.9"]["gap_to_full"] == pytest.approx(-2.0)
  # Per-seed gaps -1 and -3: their spread, not the methods' own stds (0 and 1.41).
  assert rows["razor@0.9"]["gap_std"] == pytest.approx(2**0.5)
  lone = [dict(runs[0], seed=5)] + runs[2:]  # razor's only seed has no full run
  row = {row["method"]: row for row in accuracy.summarize(lone)}["razor@0.9"]
  assert row["gap_std"] is None and row["gap_to_full"] == pytest.approx(-2.0)  # 89 - 91
  # A full run of a seed razor lacks does not move razor's gap (paired seeds only).
  extra = runs + [{**runs[2], "seed": 7, "top1": 50.0}]
  assert {row["method"]: row for row in accuracy.summarize(extra)}["razor@0.9"][
      "gap_to_full"] == pytest.approx(-2.0)
  assert [row["method"] for row in accuracy.summarize(runs)] == ["full", "razor@0.9"]
  base = {"lr": 0.5, "optimizer": {"name": "sgd"}, "warmup_steps": 50, "total_steps": 500}
  methods = accuracy.methods()
  assert list(methods)[:2] == ["full", "razor@0.8"]
  config = accuracy.run_config(base, methods["razor@0.9 attention exact"], "adam", 2,
                               total_steps=60)
  assert (config["optimizer"]["name"], config["lr"], config["seed"]) == ("adam", 1e-3, 2)
  # As recorded: log4 values, the default's before 0.8.
  assert config["prune_ratio"] == 0.9 and config["policy"] == {"attention": 0.0,
                                                               "value_format": "log4"}
  assert methods["razor@0.9"]["policy"] == {"value_format": "log4"}
  assert config["total_steps"] == config["eval_every"] == 60 and config["warmup_steps"] == 6


def test_sweeps_writing_one_file_keep_each_others_runs(tmp_path, monkeypatch):
  path = str(tmp_path / "runs.json")
  other = {"optimizer": "sgd", "prune_ratio": 0.0, "method": "full", "seed": 9,
           "total_steps": 5, "top1": 50.0}

  def fake_run(config, workdir, datasets=None):
    # Another sweep saves a run to the same file while this one trains.
    accuracy.save(path, accuracy.load_runs(path) + [other], {})
    return {"eval/accuracy": 0.5 + config["seed"] / 10, "eval/examples": 10}

  monkeypatch.setattr(accuracy.train, "run", fake_run)
  base = {"lr": 0.1, "optimizer": {"name": "sgd"}, "warmup_steps": 0, "total_steps": 5}
  runs = accuracy.sweep(base, path, prune_ratios=(0.9,), extra={}, seeds=(0, 1),
                        optimizers=("sgd",), say=lambda _: None)
  saved = {(r["method"], r["seed"]): r["top1"] for r in accuracy.load_runs(path)}
  assert saved == {("full", 9): 50.0, ("razor@0.9", 0): 50.0, ("razor@0.9", 1): 60.0}
  assert len(runs) == 3


def test_fidelity_accuracy_scope_narrows_the_grid_and_rejects_unknown_names():
  import argparse  # pylint: disable=g-import-not-at-top
  from benchmarks import fidelity  # pylint: disable=g-import-not-at-top
  args = argparse.Namespace(optimizers="sgd", steps="500", seeds="0,1",
                            methods="razor@0.9 sample", tasks=None)
  assert fidelity._scope(args) == {"optimizers": ("sgd",), "steps": (500,), "seeds": (0, 1),
                                   "methods": ("razor@0.9 sample",)}
  assert fidelity._scope(argparse.Namespace(optimizers=None, steps=None, seeds=None,
                                            methods="", tasks=None)) == {"methods": ()}
  # A misspelt method or task fails before any run starts (nothing is written).
  with pytest.raises(ValueError, match=r"unknown methods or tasks \['razor@0.9 samples'\]"):
    fidelity.run_accuracy("/nonexistent", {"methods": ("razor@0.9 samples",)})
  with pytest.raises(ValueError, match=r"unknown methods or tasks \['cifar'\]"):
    fidelity.run_accuracy("/nonexistent", {"tasks": ("cifar",)})
  # Methods outside the default grid are taken by name (the default policy's own label).
  assert "razor@0.8 sign + softmax ulog3" not in fidelity.ACCURACY_METHODS
  assert fidelity.accuracy_scope({"methods": ("razor@0.8 sign + softmax ulog3",)})[
      "methods"] == ("razor@0.8 sign + softmax ulog3",)


def test_fidelity_methods_are_the_accuracy_methods():
  """benchmarks.fidelity names the accuracy methods it runs without importing the trainer;
  the two lists must not drift apart."""
  from benchmarks import fidelity  # pylint: disable=g-import-not-at-top
  assert set(fidelity.ACCURACY_METHODS) <= set(accuracy.FIDELITY_METHODS)
  assert "razor@0.9 attention 0.8" in fidelity.ACCURACY_METHODS


def test_attention_copy_ratios_change_the_gradient_and_are_restored():
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from benchmarks import attention_ablation  # pylint: disable=g-import-not-at-top
  from razor_jax import ops  # pylint: disable=g-import-not-at-top
  from razor_jax.ops import PackSpec  # pylint: disable=g-import-not-at-top
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 12, 2, 8)) for i in range(3))
  spec = PackSpec(0.9, value_format="float32")  # kept values exact: only pruning differs

  def grads():
    def loss(q, k, v):
      logits = ops.attention_logits(q, k, spec)
      return jnp.sum(ops.softmax_attend(logits, v, spec) ** 2)
    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)  # traced anew each call

  def exact():
    def loss(q, k, v):
      p = jax.nn.softmax(jnp.einsum("bqhd,bkhd->bhqk", q, k))
      return jnp.sum(jnp.einsum("bhqk,bkhd->bqhd", p, v) ** 2)
    return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)

  default = grads()
  with attention_ablation.copy_ratios(0.0, 0.0, 0.0, 0.0):
    all_kept = grads()
  with attention_ablation.copy_ratios(0.9, 0.9, 0.0, 0.9):
    p_kept = grads()
  with attention_ablation.copy_ratios(0.9, 0.9, 0.9, 0.9, head_rows=True):
    per_head = grads()
  after = grads()
  # Every copy kept: the exact gradients. P alone kept: v's gradient (P^T g) is exact,
  # q's (through the pruned k and v) is neither the default's nor the exact one.
  for got, want in zip(all_kept, exact()):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(p_kept[2], exact()[2], rtol=1e-4, atol=1e-5)
  assert not np.allclose(default[2], exact()[2])
  assert not np.allclose(p_kept[0], default[0]) and not np.allclose(p_kept[0], exact()[0])
  assert not np.allclose(per_head[0], default[0])  # K per head, not per token
  for got, want in zip(after, default):  # the library's rules are back
    np.testing.assert_array_equal(got, want)


def test_policy_memory_parses_fields_and_names_the_known_ones():
  from benchmarks import policy_memory  # pylint: disable=g-import-not-at-top
  assert policy_memory.parse_fields("attention=0.8, estimator=energy") == {
      "attention": 0.8, "estimator": "energy"}
  assert policy_memory.parse_fields("") == {}
  with pytest.raises(ValueError, match="field=value"):
    policy_memory.parse_fields("attention")
  case = Case("B/16", 32, Method("razor", 0.9))
  config = policy_memory.policy_config(case, {"attention": 0.8}, gpu=False)
  assert config.policy.attention == 0.8 and config.prune_ratio == 0.9
  with pytest.raises(ValueError, match="no field 'atention'.*'attention'"):
    policy_memory.policy_config(case, {"atention": 0.8}, gpu=False)
