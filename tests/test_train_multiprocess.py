"""Two processes train like one: jax.distributed on loopback, CPU collectives through gloo.

The demo config with a tiny ViT (--config.* overrides), FSDP over both devices, one per
process, so the parameters are split across the processes. Four runs, shared by the tests
(module fixture):

  one      1 process x 2 devices, steps 0-20, fed the 2 hosts' batches side by side
           (tests/multiprocess_child.py): the reference
  sigterm  2 processes x 1 device (experiments' launcher) from scratch; SIGTERM to process
           1 once they have joined: both save the same step and stop
  resumed  1 process resumes the 2-process checkpoint and finishes: = `one`
  two      2 processes resume `one`'s checkpoint of step 4 and finish: same losses,
           params and evaluation as `one`

A compilation cache shared by the runs keeps each topology's compile to one. One device per
process keeps the runs short on 2 cores; in-process devices are covered by the
single-process multi-device tests (test_train_loop). These runs once hung now and then
(both processes waiting inside the razor ops' CPU conditionals, each in a collective the
other had not reached); multi-process runs now take the ops' straight-line forms
(`barriers.straight_line`).
"""
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time

import chex
import numpy as np
import pytest

from razor_jax.train import checkpoint, launch

# Subprocess runs of a minute or more on 2 cores (see setup.cfg's marker).
pytestmark = pytest.mark.slow

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(TESTS_DIR)
FINETUNE = os.path.join(REPO, "experiments", "finetune.py")
TOTAL = 20
FLAGS = ["--config", "demo", "--config.init_path=", "--config.model.num_layers=1",
         "--config.model.hidden_size=32", "--config.model.mlp_dim=64",
         "--config.model.num_heads=2", "--config.image_size=16", "--config.batch_size=16",
         "--config.mesh.data=1", "--config.mesh.fsdp=2", f"--config.total_steps={TOTAL}",
         "--config.warmup_steps=2", "--config.log_every=1", f"--config.eval_every={TOTAL}",
         "--config.checkpoint_every=4", "--config.keep_checkpoints=10",
         "--config.memory_report=False",
         "--config.progress_bar=False"]
TIMEOUT_S = 600
RESUME_AT = 4  # `two` starts from `one`'s checkpoint of this step


# Runs that must finish keep the trainer's heartbeat timeout (60 s), so a slow heartbeat on
# a loaded 2-core machine cannot end them (the CI failure first blamed on a 10 s timeout
# was the hang `barriers.straight_line` removes). Only the SIGKILL test, which waits for
# the survivor to notice a dead peer, shortens it (a false alarm there ends the run with
# the same error the test expects).
HEARTBEAT_S, SIGKILL_HEARTBEAT_S = 60, 10


def _env(cache_dir, devices=None, heartbeat_s=HEARTBEAT_S, **extra):
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([TESTS_DIR, REPO]), JAX_PLATFORMS="cpu",
             JAX_COMPILATION_CACHE_DIR=cache_dir, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
             RAZOR_HEARTBEAT_TIMEOUT_S=str(heartbeat_s), RAZOR_SHUTDOWN_TIMEOUT_S="20", **extra)
  if devices:  # conftest's other flags (LLVM at level 0) stay
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [f"--xla_force_host_platform_device_count={devices}"])
  return env


def _one_process(ctx, workdir):
  """A 1-process run (2 devices) fed as 2 hosts would be; (returncode, output)."""
  proc = subprocess.run(
      [sys.executable, os.path.join(TESTS_DIR, "multiprocess_child.py"), "2"] + ctx["flags"]
      + ["--workdir", workdir], env=_env(ctx["cache"], devices=2), capture_output=True,
      text=True, timeout=TIMEOUT_S)
  return proc.returncode, proc.stdout + proc.stderr


def _launch(ctx, workdir, extra=(), grace=60, heartbeat_s=HEARTBEAT_S):
  """Popen of 2 processes x 1 device of finetune.py through the launcher."""
  return subprocess.Popen(
      [sys.executable, launch.__file__, "-n", "2", "--devices_per_process", "1", "--grace",
       str(grace), "--", sys.executable, FINETUNE] + ctx["flags"] + list(extra)
      + ["--workdir", workdir],
      env=_env(ctx["cache"], heartbeat_s=heartbeat_s), stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _kill_group(proc) -> None:
  try:
    os.killpg(proc.pid, signal.SIGKILL)
  except ProcessLookupError:  # already gone
    pass


def _communicate(proc) -> str:
  """proc's output once it ends; past TIMEOUT_S its whole process group (the launcher and
  its children) is killed and the test fails with the output, rather than leaving a
  hung run behind."""
  try:
    return proc.communicate(timeout=TIMEOUT_S)[0]
  except subprocess.TimeoutExpired:
    _kill_group(proc)
    out = proc.communicate()[0]
    raise AssertionError(f"still running after {TIMEOUT_S} s, killed:\n{out[-3000:]}") from None


def _wait_for(proc, pattern, lines, timeout=TIMEOUT_S):
  """Reads proc's output into `lines` until a line matches `pattern`; returns the match.

  A run that stops printing cannot block the read: past `timeout` a timer kills its
  process group, which ends the output, and the test fails with what it printed.
  """
  timer = threading.Timer(timeout, _kill_group, (proc,))
  timer.start()
  try:
    for line in proc.stdout:
      lines.append(line)
      match = re.search(pattern, line)
      if match:
        return match
  finally:
    timer.cancel()
  _kill_group(proc)
  raise AssertionError(f"no line matched {pattern!r} (killed after {timeout} s if still"
                       " running):\n" + "".join(lines))


def _losses(workdir, after=0):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return {r["step"]: r["train/loss"] for r in rows if "train/loss" in r and r["step"] > after}


def _evals(workdir):
  rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
  return [r for r in rows if "eval/accuracy" in r]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  root = tmp_path_factory.mktemp("multiprocess")
  ctx = {"cache": str(root / "cache"),
         "flags": FLAGS + [f"--config.data_dir={root / 'tfds'}"]}
  times = {}

  start = time.monotonic()
  code, out = _one_process(ctx, str(root / "one"))
  assert code == 0, out
  times["one"] = time.monotonic() - start

  start = time.monotonic()
  proc = _launch(ctx, str(root / "sigterm"))
  lines = []
  pids = _wait_for(proc, r"launched 2 processes \(pids (\d+) (\d+)\)", lines).groups()
  _wait_for(proc, r"2 processes joined: 2 devices, 1 in each", lines)
  os.kill(int(pids[1]), signal.SIGTERM)  # one process only
  rest = _communicate(proc)
  sigterm = {"code": proc.returncode, "out": "".join(lines) + rest}
  times["sigterm"] = time.monotonic() - start

  shutil.copytree(root / "sigterm", root / "resumed")
  start = time.monotonic()
  code, out = _one_process(ctx, str(root / "resumed"))
  assert code == 0, out
  resumed_out = out
  times["resumed"] = time.monotonic() - start

  shutil.copytree(root / "one", root / "two")
  for step in checkpoint.intact_steps(str(root / "two")):
    if step > RESUME_AT:
      shutil.rmtree(root / "two" / "checkpoints" / str(step))
  start = time.monotonic()
  proc = _launch(ctx, str(root / "two"))
  two_out = _communicate(proc)
  assert proc.returncode == 0, two_out
  times["two"] = time.monotonic() - start
  print(f"multi-process runs, seconds: {times}")
  for name, text in (("sigterm", sigterm["out"]), ("resumed", resumed_out), ("two", two_out)):
    (root / f"{name}.log").write_text(text)  # for a failing test's reader
  return {"root": root, "ctx": ctx, "sigterm": sigterm, "resumed_out": resumed_out,
          "two_out": two_out, "times": times}


def test_two_processes_train_like_one(runs):
  root = runs["root"]
  one, two = str(root / "one"), str(root / "two")
  assert f"resuming from the checkpoint of step {RESUME_AT}" in runs["two_out"]
  expected, got = _losses(one), _losses(two, after=RESUME_AT)
  assert sorted(got) == list(range(RESUME_AT + 1, TOTAL + 1))
  np.testing.assert_allclose([got[s] for s in got], [expected[s] for s in got], rtol=1e-5)
  chex.assert_trees_all_close(checkpoint.load_params(two), checkpoint.load_params(one),
                              rtol=1e-5, atol=1e-6)
  # From scratch too: the 2-process run's steps before the SIGTERM.
  sigterm = _losses(str(root / "sigterm"))
  assert sigterm
  np.testing.assert_allclose([sigterm[s] for s in sigterm], [expected[s] for s in sigterm],
                             rtol=1e-5)


def test_eval_over_two_processes_equals_one(runs):
  one, two = _evals(str(runs["root"] / "one")), _evals(str(runs["root"] / "two"))
  assert one[-1]["step"] == two[-1]["step"] == TOTAL
  assert one[-1]["eval/examples"] == two[-1]["eval/examples"] == 191  # every digit, once
  assert one[-1]["eval/accuracy"] == two[-1]["eval/accuracy"]
  np.testing.assert_allclose(two[-1]["eval/loss"], one[-1]["eval/loss"], rtol=1e-5)


def test_only_process_0_writes_metrics_and_prints(runs):
  # `two` began as a copy of `one`'s workdir: its own rows follow `one`'s.
  copied = len(open(runs["root"] / "one" / "metrics.jsonl").readlines())
  rows = [json.loads(line) for line in open(runs["root"] / "two" / "metrics.jsonl")][copied:]
  after = [r["step"] for r in rows if "train/loss" in r]
  assert after == list(range(RESUME_AT + 1, TOTAL + 1))  # each step once, not once per process
  assert runs["two_out"].count("done: step 20") == 1


def test_sigterm_to_one_process_saves_and_stops_both(runs):
  sigterm, root = runs["sigterm"], runs["root"]
  assert sigterm["code"] == 143, sigterm["out"]  # 128 + SIGTERM: preempted, not failed
  stopped = re.search(r"stopped at step (\d+) with a checkpoint", sigterm["out"])
  assert stopped, sigterm["out"]
  step = int(stopped.group(1))
  assert 0 < step < TOTAL
  assert checkpoint.intact_steps(str(root / "sigterm"))[-1] == step
  # The rerun (here as 1 process: the checkpoint restores into another topology) loses
  # no step: it resumes at the stop and ends with the uninterrupted run's params.
  assert f"resuming from the checkpoint of step {step}" in runs["resumed_out"]
  chex.assert_trees_all_close(checkpoint.load_params(str(root / "resumed")),
                              checkpoint.load_params(str(root / "one")), rtol=1e-5, atol=1e-6)


def test_each_process_reads_a_disjoint_shard(runs):
  from razor_jax.data import pipeline, tfds_source  # pylint: disable=g-import-not-at-top
  path = pipeline.prepare("digits_demo", str(runs["root"] / "tfds"))
  source = tfds_source.TfdsSource("digits_demo", path, image_key="image", label_key="label")
  shards = [[ex["image"] for ex in source.read("train", i, 2)[0].as_numpy_iterator()]
            for i in range(2)]
  everything = [ex["image"] for ex in source.read("train", 0, 1)[0].as_numpy_iterator()]
  assert shards[0] and shards[1]
  assert not set(shards[0]) & set(shards[1])
  assert sorted(shards[0] + shards[1]) == sorted(everything)


def test_sigkill_of_one_process_ends_the_other_with_an_error(runs, tmp_path):
  # A grace longer than the test: the survivor must end by itself (jax's heartbeat).
  proc = _launch(runs["ctx"], str(tmp_path / "run"), grace=TIMEOUT_S,
                 heartbeat_s=SIGKILL_HEARTBEAT_S)
  lines = []
  pids = _wait_for(proc, r"launched 2 processes \(pids (\d+) (\d+)\)", lines).groups()
  _wait_for(proc, r"2 processes joined", lines)
  killed = time.monotonic()
  os.kill(int(pids[1]), signal.SIGKILL)
  rest = _communicate(proc)
  elapsed = time.monotonic() - killed
  out = "".join(lines) + rest
  assert proc.returncode != 0, out
  assert "process 1 exited with status 137" in out
  assert "another task died" in out or "heartbeat" in out.lower(), out[-3000:]
  assert elapsed < 60, out[-3000:]  # SIGKILL_HEARTBEAT_S = 10
  print(f"survivor ended {elapsed:.1f} s after the SIGKILL")


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _finetune(ctx, workdir, env, extra=()):
  return subprocess.Popen([sys.executable, FINETUNE] + ctx["flags"] + list(extra)
                          + ["--workdir", workdir], env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, start_new_session=True)


def test_distributed_errors_name_the_problem(tmp_path):
  ctx = {"cache": str(tmp_path / "cache"), "flags": FLAGS + [f"--config.data_dir={tmp_path}"]}
  # No coordinator at that address.
  proc = _finetune(ctx, str(tmp_path / "a"), _env(
      ctx["cache"], devices=1, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}",
      JAX_NUM_PROCESSES="2", JAX_PROCESS_ID="1", RAZOR_INIT_TIMEOUT_S="3"))
  out = _communicate(proc)
  assert proc.returncode == 1 and "could not reach the coordinator" in out, out
  assert "Traceback" not in out

  # Processes that disagree on how many they are.
  address = f"127.0.0.1:{_free_port()}"
  procs = [_finetune(ctx, str(tmp_path / "b"), _env(
      ctx["cache"], devices=1, JAX_COORDINATOR_ADDRESS=address, JAX_NUM_PROCESSES=num,
      JAX_PROCESS_ID=pid, RAZOR_INIT_TIMEOUT_S="20")) for pid, num in (("0", "2"), ("1", "3"))]
  for proc in procs:
    out = _communicate(proc)
    assert proc.returncode == 1, out
    assert "different JAX_NUM_PROCESSES (process 0: 2, process 1: 3" in out, out

  # A global batch that does not split over the 2 devices of both processes.
  proc = _launch(ctx, str(tmp_path / "c"), extra=["--config.batch_size=5"])
  out = _communicate(proc)
  assert proc.returncode == 1, out
  assert "batch_size must be divisible by the number of devices (2, over all 2 processes" in out
  assert "Traceback" not in out
