"""The training loop on a tiny ViT: sharding, resume, preemption, divergence, small batches.

tests/conftest.py gives 8 CPU devices. Runs share one config where they can, so the
compiled step is reused (razor_jax.train.setup.compile_step caches it) and the suite stays fast.
"""
import copy
import fcntl
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from razor_jax import train
from razor_jax.train import checkpoint, sharding
from razor_jax.train import config as train_config
from razor_jax.train import setup as train_setup
from razor_jax.train import step as train_step
from synthetic_data import SyntheticData

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)

TINY = dict(
    dataset="synthetic", image_size=8, batch_size=8, total_steps=12, warmup_steps=2, lr=0.1,
    model=dict(variant="", patch_size=4, hidden_size=32, mlp_dim=64, num_heads=2, num_layers=1),
    init_path="", prune_ratio=0.9, log_every=2, eval_every=6, checkpoint_every=4,
    memory_report=False, progress_bar=False, mesh=dict(data=4, fsdp=2))
BASELINE = {**TINY, "memory_report": True}


def tiny(**overrides):
  """TINY with some fields changed (nested dicts are merged)."""
  config = copy.deepcopy(TINY)
  for key, value in overrides.items():
    if isinstance(value, dict):
      config[key] = {**config.get(key, {}), **value}
    else:
      config[key] = value
  return config


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache for the child processes: only the first compiles."""
  return str(tmp_path_factory.mktemp("compile_cache"))


def _shared_dir(tmp_path_factory):
  """A folder of this test session that every xdist worker sees."""
  base = tmp_path_factory.getbasetemp()
  return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def baseline(tmp_path_factory):
  """An uninterrupted run of TINY, FSDP over 2 of the 8 devices: (result, params, workdir).

  Computed once per session: the first xdist worker runs it, the others wait and read it.
  """
  root = _shared_dir(tmp_path_factory)
  workdir = root / "train_baseline"
  with open(root / "train_baseline.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not (workdir / "result.json").exists():
      result = train.run(BASELINE, str(workdir), datasets=SyntheticData())
      (workdir / "result.json").write_text(json.dumps(result))
  result = json.loads((workdir / "result.json").read_text())
  return result, checkpoint.load_params(str(workdir)), str(workdir)


def _batch(config, seed=0):
  return next(SyntheticData().train_batches(
      "synthetic", batch_size=config.batch_size, image_size=config.image_size, seed=seed))


def _steps(config, mesh, steps, compiled=None):
  """(state, metrics) after `steps` train steps on `mesh`, from the same init and batches.

  Without `compiled`, the step is jitted here under chex.assert_max_traces(n=1): new
  batches, keys and step numbers must not retrace it.
  """
  model = train_setup.build_model(config, 4)
  tx, schedule = train_step.make_optimizer(config)
  abstract = train_setup.abstract_state(model, tx, config)
  shardings = sharding.tree_shardings(mesh, abstract)
  if compiled is None:
    chex.clear_trace_counter()  # chex counts per code object, across the calls of _steps
    step = chex.assert_max_traces(train_step.make_train_step(
        model, tx, schedule, grad_accum_steps=config.grad_accum_steps), n=1)
    compiled = train_setup.jit_train_step(step, mesh, shardings)
  state = train_setup.init_state(model, tx, config, mesh, shardings, jax.random.key(0))
  rng = jax.device_put(jax.random.key(1), sharding.replicated(mesh))
  for i in range(steps):
    state, metrics = compiled(state, sharding.global_batch(_batch(config, seed=i), mesh), rng)
  return jax.device_get(state), jax.device_get(metrics)


@pytest.mark.slow
def test_baseline_learns(baseline):
  result, params, _ = baseline
  assert result["step"] == 12 and not result["preempted"]
  assert result["eval/accuracy"] > 0.5, result  # 4 classes: chance is 0.25
  assert result["eval/examples"] == 36  # the padded last eval batch is masked, not counted
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.slow
def test_sharded_step_matches_single_device(baseline):
  config = train_config.complete(BASELINE)
  eight = sharding.make_mesh(config.mesh.data, config.mesh.fsdp)
  assert eight.shape == {"data": 4, "fsdp": 2}
  # The baseline run's executable, from train_setup's cache when this worker ran it.
  model = train_setup.build_model(config, 4)
  _, abstract, compiled = train_setup.compile_step(model, config, eight)
  specs = [leaf.sharding.spec for leaf in jax.tree.leaves(abstract.params)]
  assert any("fsdp" in spec for spec in specs), "fsdp=2 should split the parameters"
  one = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  state1, metrics1 = _steps(config, one, steps=2)
  state8, metrics8 = _steps(config, eight, steps=2, compiled=compiled)
  assert int(state8.step) == int(state1.step) == 2
  chex.assert_trees_all_close(state8.params, state1.params, rtol=2e-5, atol=2e-6)
  chex.assert_trees_all_close(metrics8, metrics1, rtol=2e-5, atol=2e-6)


@pytest.mark.slow
def test_gradient_accumulation_matches_the_full_batch():
  mesh = sharding.make_mesh(1, 1, devices=jax.devices()[:1])
  full = _steps(train_config.complete(tiny(prune_ratio=0.0)), mesh, steps=2)
  accumulated = _steps(train_config.complete(tiny(prune_ratio=0.0, grad_accum_steps=4)),
                       mesh, steps=2)
  chex.assert_trees_all_close(accumulated, full, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_interrupted_and_resumed_equals_uninterrupted(baseline, tmp_path):
  result, params, _ = baseline
  first = train.run(tiny(), str(tmp_path), datasets=SyntheticData(), stop_at_step=6)
  assert first["preempted"] and first["step"] == 6
  assert _finished_steps(str(tmp_path))[-1] == 6
  second = train.run(tiny(), str(tmp_path), datasets=SyntheticData())
  assert second["step"] == 12 and not second["preempted"]
  chex.assert_trees_all_equal(checkpoint.load_params(str(tmp_path)), params)
  assert second["eval/loss"] == result["eval/loss"]


_CHILD = textwrap.dedent("""
    import json, sys
    from razor_jax import train
    from synthetic_data import SyntheticData
    config, workdir, delay = json.loads(sys.argv[1]), sys.argv[2], float(sys.argv[3])
    result = train.run(config, workdir, datasets=SyntheticData(delay_s=delay))
    print("RESULT " + json.dumps(result), flush=True)
""")


def _child(config, workdir, delay, cache_dir):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO]),
             JAX_COMPILATION_CACHE_DIR=cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
  return subprocess.Popen([sys.executable, "-c", _CHILD, json.dumps(config), workdir, str(delay)],
                          env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finished_steps(workdir):
  directory = os.path.join(workdir, "checkpoints")
  if not os.path.isdir(directory):
    return []
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


@pytest.mark.slow
def test_sigkill_restarts_from_last_complete_checkpoint(baseline, compile_cache, tmp_path):
  _, params, _ = baseline
  workdir, cache = str(tmp_path / "run"), compile_cache
  config = tiny(checkpoint_every=2)
  child = _child(config, workdir, delay=0.25, cache_dir=cache)
  deadline = time.time() + 120
  while time.time() < deadline and not [s for s in _finished_steps(workdir) if s >= 4]:
    assert child.poll() is None, child.stdout.read()
    time.sleep(0.05)
  child.send_signal(signal.SIGKILL)
  child.wait()
  killed_at = _finished_steps(workdir)
  assert killed_at and killed_at[-1] < 12, killed_at
  resumed = _child(config, workdir, delay=0.0, cache_dir=cache)
  out, _ = resumed.communicate(timeout=300)
  assert resumed.returncode == 0, out
  assert f"resuming from the checkpoint of step {killed_at[-1]}" in out
  result = json.loads(out.split("RESULT ", 1)[1])
  assert result["step"] == 12
  chex.assert_trees_all_equal(checkpoint.load_params(workdir), params)


@pytest.mark.slow
def test_sigterm_saves_and_stops(compile_cache, tmp_path):
  workdir = str(tmp_path / "run")
  child = _child(tiny(), workdir, delay=0.4, cache_dir=compile_cache)
  deadline = time.time() + 120
  while time.time() < deadline and not _finished_steps(workdir):  # in the loop by then
    assert child.poll() is None, child.stdout.read()
    time.sleep(0.05)
  child.send_signal(signal.SIGTERM)
  out, _ = child.communicate(timeout=120)
  assert child.returncode == 0, out
  result = json.loads(out.split("RESULT ", 1)[1])
  assert result["preempted"] and result["step"] < 12
  assert _finished_steps(workdir)[-1] == result["step"]


@pytest.mark.slow
@pytest.mark.parametrize("optimizer", ["sgd", "adam"])
def test_batch_size_one_trains(optimizer, tmp_path):
  lr = {"sgd": 0.05, "adam": 0.003}[optimizer]
  config = tiny(batch_size=1, total_steps=60, warmup_steps=5, lr=lr, eval_every=60,
                eval_batch_size=12, crop_area_min=0.22,
                checkpoint_every=60, log_every=10, mesh=dict(data=1, fsdp=1),
                optimizer=dict(name=optimizer))
  data = SyntheticData()
  result = train.run(config, str(tmp_path), datasets=data)
  assert data.crop_area_min == 0.22  # the config's crop reaches the data pipeline
  assert result["step"] == 60
  assert result["eval/accuracy"] > 0.5, result  # 4 classes: chance is 0.25


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Batches from index 5 on are NaN: update 6 diverges; the checkpoint of step 4 is good.
  with pytest.raises(train.NonFiniteLossError, match=r"diverged at step 6.*step 4"):
    train.run(tiny(), str(tmp_path), datasets=SyntheticData(nan_from_step=5))
  assert _finished_steps(str(tmp_path)) == [4]
  params = checkpoint.load_params(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


def test_bfloat16_computes_in_bfloat16_and_keeps_float32_params():
  config = train_config.complete(tiny(dtype="bfloat16"))
  model = train_setup.build_model(config, 4)
  assert model.dtype == jnp.bfloat16
  tx, _ = train_step.make_optimizer(config)
  abstract = train_setup.abstract_state(model, tx, config)
  assert {x.dtype for x in jax.tree.leaves(abstract.params)} == {jnp.dtype(jnp.float32)}
  logits = jax.eval_shape(lambda p: model.apply({"params": p}, jnp.zeros((2, 8, 8, 3))),
                          abstract.params)
  assert logits.dtype == jnp.float32  # the loss is computed in float32 whatever the dtype


@pytest.mark.slow
def test_metrics_are_json_lines_and_tensorboard_events(baseline):
  workdir = baseline[2]
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  assert [r["step"] for r in rows if "train/loss" in r] == [2, 4, 6, 8, 10, 12]
  assert [r["step"] for r in rows if "eval/accuracy" in r] == [6, 12]
  assert {"train/accuracy", "train/images_per_second", "train/lr"} <= set(rows[-2])
  events = os.listdir(os.path.join(workdir, "tensorboard"))
  assert any(name.startswith("events.out.tfevents") for name in events), events


@pytest.mark.slow
def test_memory_report_compares_with_full_finetuning(baseline):
  result, _, workdir = baseline
  # Both are reported; at this toy size packing overheads can outweigh the saving (the
  # demo's ViT already needs 5x less), so only their presence is checked here.
  assert result["peak_bytes"] > 0 and result["full_finetuning_peak_bytes"] > 0
  first = json.loads(open(os.path.join(workdir, "metrics.jsonl")).readline())
  assert first["memory/full_finetuning_peak_bytes"] == result["full_finetuning_peak_bytes"]


@pytest.mark.slow
def test_starts_from_a_public_format_checkpoint(baseline, tmp_path):
  from razor_jax.models.vit import export  # pylint: disable=g-import-not-at-top
  _, params, _ = baseline
  path = str(tmp_path / "pretrained.npz")
  export(params, path)
  # The first update has learning rate 0 (warm-up starts there): the checkpoint of step
  # 1 holds the loaded params, with a new (zero) head for the new task.
  workdir = str(tmp_path / "run")
  train.run(tiny(init_path=path), workdir, datasets=SyntheticData(), stop_at_step=1)
  expected = {**params, "head": jax.tree.map(np.zeros_like, params["head"])}
  chex.assert_trees_all_equal(checkpoint.load_params(workdir), expected)


def test_config_errors_are_clear(tmp_path):
  with pytest.raises(train.ConfigError, match="divisible by the number of devices"):
    train.run(tiny(batch_size=12), str(tmp_path), datasets=SyntheticData())
  with pytest.raises(train.ConfigError, match=r"crop_area_min must be in \(0, 1\].*got 1.5"):
    train.run(tiny(crop_area_min=1.5), str(tmp_path), datasets=SyntheticData())
  with pytest.raises(train.ConfigError, match="unknown config key 'optimiser'"):
    train.run(tiny(optimiser=dict(name="sgd")), str(tmp_path), datasets=SyntheticData())
  with pytest.raises(train.CheckpointMissingError, match="init_path='missing.npz'"):
    train.run(tiny(init_path="missing.npz"), str(tmp_path), datasets=SyntheticData())
  assert not os.path.exists(tmp_path / "checkpoints")
