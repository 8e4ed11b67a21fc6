"""The local launcher (razor_jax.train.launch, experiments/launch_local.sh) with small children.

The children are a few lines of Python, not training runs: what is tested is the
environment each process gets, signal forwarding, the exit status and that no process
is left behind. tests/test_train_multiprocess.py launches real runs.
"""
import os
import signal
import subprocess
import sys
import time

import pytest

from razor_jax.train import launch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Each child writes its environment (and later its fate) to DIR/<process id>.
_CHILD = """
import os, signal, sys, time
out = os.path.join(sys.argv[1], os.environ["JAX_PROCESS_ID"])
def note(text):
  with open(out, "a") as f:
    f.write(text + "\\n")
note(" ".join(os.environ[k] for k in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES",
                                       "JAX_PROCESS_ID", "XLA_FLAGS")) + f" pid={os.getpid()}")
signal.signal(signal.SIGTERM, lambda *a: (note("SIGTERM"), sys.exit(143)))
mode = sys.argv[2]
if mode == "fail" and os.environ["JAX_PROCESS_ID"] == "1":
  sys.exit(3)
if mode in ("fail", "wait"):
  time.sleep(60)  # until signalled or killed
"""


def _launcher(tmp_path, mode, n=2, grace=1.0):
  return subprocess.Popen(
      # The file itself: only the standard library, without importing jax with the package.
      [sys.executable, launch.__file__, "-n", str(n), "--devices_per_process", "2",
       "--grace", str(grace), "--", sys.executable, "-c", _CHILD, str(tmp_path), mode],
      env=dict(os.environ, PYTHONPATH=REPO, XLA_FLAGS="--xla_foo=1"),
      stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _notes(tmp_path, n=2):
  return [(tmp_path / str(i)).read_text().splitlines() if (tmp_path / str(i)).exists() else []
          for i in range(n)]


def _pid(note_lines):
  return int(note_lines[0].rsplit("pid=", 1)[1])


def _alive(pid):
  """Running (a zombie waiting for a container's init to reap it has ended)."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] != "Z"
  except FileNotFoundError:
    return False


def test_each_process_gets_the_coordinator_its_id_and_its_devices(tmp_path):
  proc = _launcher(tmp_path, "ok", n=3)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 0, out
  notes = _notes(tmp_path, 3)
  addresses = {lines[0].split()[0] for lines in notes}
  assert len(addresses) == 1 and addresses.pop().startswith("127.0.0.1:")
  for i, lines in enumerate(notes):
    _, num, pid, *flags = lines[0].split()
    assert (num, pid) == ("3", str(i))
    assert flags[:2] == ["--xla_foo=1", "--xla_force_host_platform_device_count=2"]


def test_one_failure_fails_the_run_and_kills_the_rest(tmp_path):
  start = time.monotonic()
  proc = _launcher(tmp_path, "fail", grace=1.0)
  out, _ = proc.communicate(timeout=60)
  assert proc.returncode == 3, out  # the failing process's status
  assert "process 1 exited with status 3" in out and "killing process 0" in out
  assert time.monotonic() - start < 30
  survivor = _pid(_notes(tmp_path)[0])
  assert not _alive(survivor)


def test_sigterm_is_forwarded_to_every_process(tmp_path):
  proc = _launcher(tmp_path, "wait")
  deadline = time.monotonic() + 30
  while not all(_notes(tmp_path)) and time.monotonic() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, _ = proc.communicate(timeout=30)
  assert proc.returncode == 143, out
  assert all(lines[-1] == "SIGTERM" for lines in _notes(tmp_path)), _notes(tmp_path)


def test_no_orphans_when_the_launcher_is_killed(tmp_path):
  proc = _launcher(tmp_path, "wait")
  deadline = time.monotonic() + 30
  while not all(_notes(tmp_path)) and time.monotonic() < deadline:
    time.sleep(0.05)
  pids = [_pid(lines) for lines in _notes(tmp_path)]
  proc.kill()  # SIGKILL: no handler of the launcher runs
  proc.wait()
  deadline = time.monotonic() + 10
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not any(_alive(p) for p in pids)


def test_launch_local_sh_needs_a_process_count():
  script = os.path.join(REPO, "experiments", "launch_local.sh")
  proc = subprocess.run([script, "--config", "demo"], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 2 and "usage:" in proc.stderr and "N processes" in proc.stderr


def test_bad_arguments():
  with pytest.raises(ValueError, match="at least 1"):
    launch.launch(["true"], 0)
  with pytest.raises(ValueError, match="after --"):
    launch.launch([], 2)
