"""Starts N processes of one command on this machine as one jax.distributed run.

  python -m razor_jax.train.launch -n 2 [--devices_per_process K] [--port P] -- \\
      python experiments/finetune.py --config demo
  experiments/launch_local.sh 2 --config demo          # the same, for finetune.py

Each process gets JAX_COORDINATOR_ADDRESS (127.0.0.1:PORT, a free port unless --port),
JAX_NUM_PROCESSES and JAX_PROCESS_ID, which razor_jax.train.sharding reads; with
--devices_per_process K on CPU, XLA_FLAGS makes each process see K CPU devices.

The launcher forwards SIGINT and SIGTERM to every process (a SIGTERM makes the run
save a checkpoint and stop). When one process fails, the others get `grace` seconds to
end by themselves (jax stops them once it sees a peer gone), then SIGKILL: no process
outlives the launcher, which also dies with its parent's SIGKILL thanks to
PR_SET_PDEATHSIG. The exit status is the first failing process's (128 + signal for a
killed one), else 0.
"""
from __future__ import annotations

import argparse
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from typing import Optional, Sequence

DEFAULT_GRACE_S = 30.0
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
  """A TCP port nothing listens on now (the OS picks it)."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def process_env(base: dict, *, process_id: int, num_processes: int, port: int,
                devices_per_process: Optional[int]) -> dict:
  """The environment of process `process_id`: the three JAX_* variables (and CPU devices)."""
  env = dict(base, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
             JAX_NUM_PROCESSES=str(num_processes), JAX_PROCESS_ID=str(process_id))
  if devices_per_process:
    flags = [f for f in env.get("XLA_FLAGS", "").split()
             if not f.startswith("--xla_force_host_platform_device_count")]
    env["XLA_FLAGS"] = " ".join(flags + [
        f"--xla_force_host_platform_device_count={devices_per_process}"])
  return env


def _die_with_parent():
  # Runs in the child between fork and exec: SIGKILL it if the launcher dies, whatever
  # the reason, so that no process of the run is left behind training alone.
  try:
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
  except OSError:  # not Linux: the launcher's own handlers are all there is
    pass


def _status(returncode: int) -> int:
  return 128 - returncode if returncode < 0 else returncode


def launch(command: Sequence[str], num_processes: int, *, devices_per_process: Optional[int] = None,
           port: Optional[int] = None, grace_s: float = DEFAULT_GRACE_S,
           say=lambda line: print(line, file=sys.stderr, flush=True)) -> int:
  """Runs `command` as processes 0..num_processes-1; returns the exit status (see above)."""
  if num_processes < 1:
    raise ValueError(f"the number of processes must be at least 1, got {num_processes}")
  if not command:
    raise ValueError("no command to launch: put it after --")
  port = port or free_port()
  children = []
  for i in range(num_processes):
    env = process_env(os.environ, process_id=i, num_processes=num_processes, port=port,
                      devices_per_process=devices_per_process)
    # A session of its own: a terminal's Ctrl-C reaches the launcher only, which
    # forwards it once, rather than every process getting it twice.
    children.append(subprocess.Popen(list(command), env=env, start_new_session=True,
                                     preexec_fn=_die_with_parent))
  say(f"launched {num_processes} processes (pids {' '.join(str(c.pid) for c in children)}),"
      f" coordinator 127.0.0.1:{port}")

  def forward(signum, frame):  # pylint: disable=unused-argument
    for child in children:
      if child.poll() is None:
        child.send_signal(signum)

  previous = {s: signal.signal(s, forward) for s in (signal.SIGINT, signal.SIGTERM)}
  status, failed_at = 0, None
  try:
    while any(c.poll() is None for c in children):
      for i, child in enumerate(children):
        code = child.poll()
        if code not in (None, 0) and failed_at is None:
          status, failed_at = _status(code), time.monotonic()
          say(f"process {i} exited with status {status}; the others get {grace_s:g} s to end")
      if failed_at is not None and time.monotonic() - failed_at > grace_s:
        for i, child in enumerate(children):
          if child.poll() is None:
            say(f"killing process {i} (pid {child.pid}), still running {grace_s:g} s after"
                " another one failed")
            child.kill()
      time.sleep(0.1)
  finally:
    for child in children:  # an exception in here (or KeyboardInterrupt) leaves no orphans
      if child.poll() is None:
        child.kill()
      child.wait()
    for s, handler in previous.items():
      signal.signal(s, handler)
  if status == 0:
    failed = [_status(c.returncode) for c in children if c.returncode != 0]
    status = failed[0] if failed else 0
  return status


def main(argv: Sequence[str]) -> int:
  argv = list(argv)
  command = []
  if "--" in argv:
    command, argv = argv[argv.index("--") + 1:], argv[:argv.index("--")]
  parser = argparse.ArgumentParser(
      prog="python -m razor_jax.train.launch",
      description="Runs COMMAND as N processes of one jax.distributed run on this machine.",
      usage="%(prog)s -n N [--devices_per_process K] [--port P] [--grace S] -- COMMAND ...")
  parser.add_argument("-n", "--num_processes", type=int, required=True)
  parser.add_argument("--devices_per_process", type=int, default=None,
                      help="CPU devices each process sees (sets XLA_FLAGS)")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: free)")
  parser.add_argument("--grace", type=float, default=DEFAULT_GRACE_S,
                      help="seconds the others get after one fails, before SIGKILL")
  args = parser.parse_args(argv)
  try:
    return launch(command, args.num_processes, devices_per_process=args.devices_per_process,
                  port=args.port, grace_s=args.grace)
  except (ValueError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
