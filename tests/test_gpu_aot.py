"""benchmarks/gpu_aot.py: the train step compiled for an H200 without one.

The compile tests run where the CUDA PJRT plugin can be imported (the gpu-aot extra, or
a `pip --target` folder named by RAZOR_JAX_GPU_AOT_PATH) and is skipped otherwise; the
checks of the environment and errors run everywhere.
"""
import json
import os
import subprocess
import sys

import pytest

from benchmarks import gpu_aot, suite
from benchmarks.cases import MODELS, Case, parse_method

RAZOR = parse_method("razor@0.9")
PLUGIN = gpu_aot.plugin_location()


def test_child_env_points_at_the_plugin_and_disables_triton_gemms(tmp_path):
  plugin = tmp_path / "site"
  (plugin / "jax_plugins" / "xla_cuda12").mkdir(parents=True)
  env = gpu_aot.child_env({gpu_aot.ENV_PATH: str(plugin), "XLA_FLAGS": "--xla_dump_to=/x",
                           "PYTHONPATH": "elsewhere"})
  assert env["JAX_PLATFORMS"] == "cpu"
  assert env["XLA_FLAGS"] == "--xla_dump_to=/x --xla_gpu_enable_triton_gemm=false"
  paths = env["PYTHONPATH"].split(os.pathsep)
  # The checkout (benchmarks/), the plugin, then what was there.
  assert paths[1:] == [str(plugin), "elsewhere"]
  assert os.path.isdir(os.path.join(paths[0], "benchmarks"))


def test_missing_plugin_and_unknown_target_say_what_to_do(tmp_path, monkeypatch):
  monkeypatch.setattr(gpu_aot.sys, "path", [str(tmp_path)])
  with pytest.raises(RuntimeError, match="gpu-aot.*RAZOR_JAX_GPU_AOT_PATH"):
    gpu_aot.child_env({gpu_aot.ENV_PATH: str(tmp_path / "nothing")})
  with pytest.raises(ValueError, match="unknown GPU target 'a100'.*h200"):
    gpu_aot.target_description("a100")
  assert "sm" not in gpu_aot.backend_name("h200") and gpu_aot.is_aot("gpu-aot:h200")
  assert "core_count: 132" in gpu_aot.target_description("h200")


def test_target_config_takes_the_gpu_choices_not_the_cpu_process():
  config = gpu_aot.target_config(Case("B/16", 32, RAZOR))
  assert (config.policy.granularity, config.model.batch_chunk) == ("token", 0)
  assert gpu_aot.gpu_settings() == {"batch_chunk": 0}


# Compiled in a child with child_env: the plugin is imported there only, and this
# process's jax stays a CPU one. Six RazorDense layers with a sine between them, the
# gradient of a sum: dense autodiff keeps each layer's input and its pre-activation;
# Back Razor keeps the pre-activation and a packed copy of the input.
STACK = """
import json, sys
import flax.linen as nn, jax, jax.numpy as jnp
from benchmarks import gpu_aot, suite
from razor_jax import Policy, RazorDense, memory

class Stack(nn.Module):
  ratio: float
  @nn.compact
  def __call__(self, x):
    policy = Policy.make(self.ratio, granularity="token")
    for _ in range(6):
      x = jnp.sin(RazorDense(512, policy=policy)(x))
    return x

mesh = gpu_aot.topology_mesh("h200")
on_gpu = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
x = jax.ShapeDtypeStruct((4096, 512), jnp.float32, sharding=on_gpu)
peaks = {}
for ratio in (0.0, 0.9):
  model = Stack(ratio)
  params = jax.eval_shape(model.init, jax.random.key(0), x)
  params = jax.tree.map(lambda p: jax.ShapeDtypeStruct(p.shape, p.dtype, sharding=on_gpu), params)
  loss = lambda p, x: jnp.sum(model.apply(p, x))
  compiled = jax.jit(jax.grad(loss)).lower(params, x).compile()
  assert "cublas" in compiled.as_text(), "not an XLA:GPU executable"
  peaks[ratio] = memory.compiled_memory(compiled).peak_bytes
print("PEAKS " + json.dumps(peaks))
"""


@pytest.mark.skipif(PLUGIN is None, reason="the CUDA PJRT plugin is not installed (gpu-aot"
                    f" extra, or {gpu_aot.ENV_PATH})")
def test_razor_stack_compiles_for_the_h200_to_less_than_dense():
  proc = subprocess.run([sys.executable, "-c", STACK], env=gpu_aot.child_env(),
                        capture_output=True, text=True, timeout=120, check=False)
  lines = [l for l in proc.stdout.splitlines() if l.startswith("PEAKS ")]
  assert lines, proc.stderr[-3000:]
  peaks = json.loads(lines[0][len("PEAKS "):])
  dense, razor = peaks["0.0"], peaks["0.9"]
  activation = 4096 * 512 * 4
  # Dense keeps 12 activations (two per layer), Back Razor 6 and six packed copies, plus
  # the selection's temporaries: 0.80x dense when written (XLA:GPU, jax 0.10.2).
  assert dense > 12 * activation, peaks
  assert razor < 0.9 * dense, peaks


# One razor@0.9 ViT-Ti/16 step compiled for the H200, with the param-gradient barriers
# (ops.param_grads_first) or, under NO_BARRIER, with barriers.together made the identity.
STEP = """
import json, os
from benchmarks import gpu_aot
from benchmarks.cases import Case, parse_method
from razor_jax import barriers, memory
from razor_jax.train import setup as train_setup
if os.environ.get("NO_BARRIER"):
  barriers.together = lambda tree: tree
case = Case("Ti/16", 32, parse_method("razor@0.9"))
config = gpu_aot.target_config(case)
model = train_setup.build_model(config, case.num_classes)
_, _, compiled = train_setup.compile_step(model, config, gpu_aot.topology_mesh("h200"))
print("PEAK " + json.dumps(memory.compiled_memory(compiled).peak_bytes))
"""


@pytest.mark.skipif(PLUGIN is None, reason="the CUDA PJRT plugin is not installed (gpu-aot"
                    f" extra, or {gpu_aot.ENV_PATH})")
def test_weight_gradients_first_lower_the_gpu_peak():
  peaks = {}
  for barrier in (True, False):
    env = gpu_aot.child_env(dict(os.environ, **({} if barrier else {"NO_BARRIER": "1"})))
    proc = subprocess.run([sys.executable, "-c", STEP], env=env, capture_output=True,
                          text=True, timeout=300, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith("PEAK ")]
    assert lines, proc.stderr[-3000:]
    peaks[barrier] = json.loads(lines[0][len("PEAK "):])
  # Without the barriers XLA:GPU defers each block's weight gradients past its attention
  # backward: 219.8 MB against 194.0 MB when written (ViT-B/16 b32: 1587 -> 1483 MB).
  assert peaks[True] < 0.95 * peaks[False], peaks


def test_plan_covers_every_vit_batch_dtype_and_headline_method_findings_first():
  plan = suite.gpu_aot_plan()
  # full, remat, the default razor (the findings') and razor@0.9 (the paper's ratio).
  assert len(plan.gpu_aot) == 4 * 3 * 2 * 4 == len(set(plan.gpu_aot))
  assert {(c.model, c.batch, c.dtype) for c in plan.gpu_aot} == {
      (m, b, d) for m in MODELS for b in (8, 32, 128) for d in ("float32", "bfloat16")}
  assert {c.method.label for c in plan.gpu_aot} == {"full", "remat", "razor@0.8", "razor@0.9"}
  assert [(c.model, c.batch) for c in plan.gpu_aot[:16]] == (
      [("B/16", 32)] * 4 + [("L/16", 128)] * 4) * 2


def test_suite_turns_child_results_into_gpu_aot_records(monkeypatch):
  cases = (Case("Ti/16", 8, parse_method("full")), Case("Ti/16", 8, RAZOR))
  calls, drop = [], False

  def fake_child(group, target, **kwargs):
    calls.append((tuple(group), target, kwargs["env"].get("JAX_COMPILATION_CACHE_DIR")))
    return {c: {"compiled_peak_bytes": 100 + i, "bits_per_element": None if i == 0 else 1.0,
                "modeled": {"time_s": 0.01, "launches": 10 * (i + 1), "round_trips": 0},
                "settings": {"granularity": "token", "batch_chunk": 0}, "compile_s": 1.0}
            for i, c in enumerate(group) if not drop or c != cases[1]}

  monkeypatch.setattr(gpu_aot, "run_child", fake_child)
  said = []
  monkeypatch.setenv("JAX_COMPILATION_CACHE_DIR", "/somewhere")
  out = suite.run(suite.Plan(gpu_aot=cases), say=said.append)
  assert len(calls) == 1 and calls[0][:2] == (cases, "h200")
  assert calls[0][2] is None  # no executable cache shared with a compile-only child
  by_method = {r.label: r for r in out}
  assert {r.backend for r in out} == {"gpu-aot:h200"}
  assert by_method["razor@0.9"].compiled_peak_bytes == 101
  assert by_method["razor@0.9"].modeled["launches"] == 20
  assert by_method["full"].settings == {"granularity": "token", "batch_chunk": 0}
  assert any("20 launches" in line for line in said), said
  # A case the child could not compile is reported, and the others are kept.
  drop, said = True, []
  out = suite.run(suite.Plan(gpu_aot=cases), say=said.append)
  assert [r.label for r in out] == ["full"]
  assert any("razor@0.9 float32: FAILED to compile" in line for line in said), said
  assert any("FAILED RuntimeError: 1 of 2 cases did not compile" in line for line in said)


@pytest.mark.skipif(PLUGIN is None, reason="the CUDA PJRT plugin is not installed (gpu-aot"
                    f" extra, or {gpu_aot.ENV_PATH})")
def test_cnn_compiles_for_the_h200_with_the_gpu_policy():
  from benchmarks import cnn
  cases = [cnn.CnnCase("tiny", m, 8, 64, 10) for m in ("full", "razor@0.9")]
  peaks = cnn.gpu_compiled_peaks(cases)
  # razor@0.9 compiles with the GPU's policy (image rows: the 3-channel stem included).
  # Measured 6.0 MB against full fine-tuning's 19.5 MB (0.31x).
  assert peaks[cases[1]] < 0.45 * peaks[cases[0]], peaks
