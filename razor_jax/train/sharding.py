"""Devices for training: multi-host start-up, the ("data", "fsdp") mesh, and shardings.

The batch is split over both mesh axes. With fsdp > 1, each parameter (and the optimizer
state beside it) is split over the "fsdp" axis along its largest dimension that divides
evenly, and gathered by XLA where it is used; with fsdp = 1 everything is replicated.
"""
from __future__ import annotations

import os
import socket
import time
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

_distributed_started = False

# How long a process waits for all the others to join, and how long a silent peer may
# go without a heartbeat before the coordinator declares it dead and the others stop
# with an error instead of waiting in a collective forever. jax's defaults (300 s and
# 100 s) suit pods that take minutes to schedule; these environment variables change them.
# A process that ends (finished, or failed with an error) waits at most the shutdown
# timeout for the others before the coordinator stops them all: a failure in one
# process then ends the others within that time rather than jax's default 5 minutes.
INIT_TIMEOUT_ENV, HEARTBEAT_TIMEOUT_ENV = "RAZOR_INIT_TIMEOUT_S", "RAZOR_HEARTBEAT_TIMEOUT_S"
SHUTDOWN_TIMEOUT_ENV = "RAZOR_SHUTDOWN_TIMEOUT_S"
DEFAULT_INIT_TIMEOUT_S, DEFAULT_HEARTBEAT_TIMEOUT_S, DEFAULT_SHUTDOWN_TIMEOUT_S = 300, 60, 60


class DistributedError(RuntimeError):
  """The processes of a multi-process run could not start together; the message says why."""


def _check_coordinator(address: str, pid: int, timeout_s: int):
  """Raises DistributedError if process 0 cannot serve `address`, or others cannot reach it."""
  host, _, port_text = address.rpartition(":")
  try:
    port = int(port_text)
  except ValueError:
    raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r} must be HOST:PORT") from None
  host = host.strip("[]")
  if pid == 0:  # the coordinator runs in process 0 and listens on that port
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
      try:
        s.bind(("", port))
      except OSError as e:
        raise DistributedError(
            f"process 0 cannot serve the coordinator on port {port} ({e.strerror}); pick a free"
            " port in JAX_COORDINATOR_ADDRESS (experiments/launch_local.sh finds one)") from None
    return
  deadline = time.monotonic() + timeout_s
  while True:
    try:
      socket.create_connection((host, port), timeout=2).close()
      return
    except OSError as e:
      if time.monotonic() > deadline:
        raise DistributedError(
            f"process {pid} could not reach the coordinator at {address} within {timeout_s} s"
            f" ({e.strerror or e}). Check that process 0 runs, that {host} is its address and"
            f" reachable from here, and that the port is open; {INIT_TIMEOUT_ENV} sets the"
            " wait") from None
      time.sleep(0.5)


def distributed_started() -> bool:
  """Whether initialize_distributed has joined this process to others."""
  return _distributed_started


def _env_int(name: str, default=None):
  raw = os.environ.get(name)
  if raw in (None, ""):
    return default
  try:
    return int(raw)
  except ValueError:
    raise DistributedError(f"{name}={raw!r} must be an integer") from None


def initialize_distributed() -> bool:
  """Starts jax.distributed when this process is one of several; True if it did.

  JAX_COORDINATOR_ADDRESS (host:port of process 0) with JAX_NUM_PROCESSES and
  JAX_PROCESS_ID names the processes explicitly (experiments/launch_local.sh sets them);
  under SLURM or Open MPI with several tasks jax finds them itself. Must run before
  anything touches a device. On CPU the collectives between processes go through gloo.

  Raises:
    DistributedError: an inconsistent environment, a coordinator that does not answer
      within RAZOR_INIT_TIMEOUT_S, or processes that disagree on how many they are.
  """
  global _distributed_started
  if _distributed_started:
    return True
  address = os.environ.get("JAX_COORDINATOR_ADDRESS", "")
  num = _env_int("JAX_NUM_PROCESSES")
  pid = _env_int("JAX_PROCESS_ID")
  if address:
    if num is None or pid is None:
      raise DistributedError(
          f"JAX_COORDINATOR_ADDRESS={address!r} is set, so JAX_NUM_PROCESSES and"
          " JAX_PROCESS_ID must be too (experiments/launch_local.sh N sets all three)")
    if num < 1 or not 0 <= pid < num:
      raise DistributedError(f"JAX_PROCESS_ID={pid} must be in [0, JAX_NUM_PROCESSES={num})")
    if ":" not in address:
      raise DistributedError(f"JAX_COORDINATOR_ADDRESS={address!r} must be HOST:PORT (process"
                             " 0's host and a free port)")
    kwargs = dict(coordinator_address=address, num_processes=num, process_id=pid)
    # jaxlib aborts the process (a C++ fatal error, no exception) when the coordinator
    # does not answer in time, so look first, from Python, where the error can be clear.
    _check_coordinator(address, pid, _env_int(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S))
  elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "OMPI_MCA_orte_hnp_uri" in os.environ):
    kwargs = {}
  else:
    return False
  init_timeout = _env_int(INIT_TIMEOUT_ENV, DEFAULT_INIT_TIMEOUT_S)
  # Collectives between processes on CPU need an implementation; gloo comes with jaxlib.
  # It only concerns the CPU backend, so GPU and TPU runs are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  try:
    jax.distributed.initialize(
        **kwargs, initialization_timeout=init_timeout,
        heartbeat_timeout_seconds=_env_int(HEARTBEAT_TIMEOUT_ENV, DEFAULT_HEARTBEAT_TIMEOUT_S),
        shutdown_timeout_seconds=_env_int(SHUTDOWN_TIMEOUT_ENV, DEFAULT_SHUTDOWN_TIMEOUT_S))
  except Exception as e:  # pylint: disable=broad-except  (jaxlib raises its own types)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    where = f" at {address}" if address else ""
    raise DistributedError(
        f"process {pid if pid is not None else '?'} could not join the other"
        f" {num if num is not None else '?'} processes through the coordinator{where} within"
        f" {init_timeout} s ({first[:300]}). Check that process 0 runs and that HOST:PORT is"
        f" its address and reachable from here, that every process got the same"
        f" JAX_NUM_PROCESSES, and that each has its own JAX_PROCESS_ID; {INIT_TIMEOUT_ENV}"
        " sets the wait") from None
  _distributed_started = True
  if num is not None:
    declared = exchange("num_processes", str(num), init_timeout)
    if len(set(declared)) > 1 or jax.process_count() != num:
      said = ", ".join(f"process {i}: {v}" for i, v in enumerate(declared) if v is not None)
      raise DistributedError(
          f"the processes were started with different JAX_NUM_PROCESSES ({said}; the"
          f" coordinator counts {jax.process_count()}); give every process the same count"
          " (experiments/launch_local.sh N does)")
  return True


_exchanges: dict = {}


def exchange(name: str, value: str, timeout_s: float = 60) -> list:
  """Every process's `value` for `name`, by process index (None where one never said).

  Goes through the coordinator's key-value store, not a device collective, so it works
  before the processes agree on anything else, and a process that is missing or failed
  costs `timeout_s`, not a hang.
  """
  if not _distributed_started or jax.process_count() == 1:
    return [value]
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  # Keys are written once: a name exchanged again (every process does the same calls in
  # the same order) gets the next number.
  _exchanges[name] = _exchanges.get(name, 0) + 1
  key = f"razor_jax/{name}/{_exchanges[name]}"
  client.key_value_set(f"{key}/{jax.process_index()}", value)
  values = []
  for i in range(jax.process_count()):
    try:
      values.append(client.blocking_key_value_get(f"{key}/{i}", int(timeout_s * 1000)))
    except Exception:  # pylint: disable=broad-except  (jaxlib's timeout error)
      values.append(None)
  return values


def make_mesh(data: int = -1, fsdp: int = 1,
              devices: Optional[Sequence[jax.Device]] = None) -> jax.sharding.Mesh:
  """A ("data", "fsdp") mesh over `devices` (all of them by default).

  data = -1 takes every device that fsdp leaves. A mesh smaller than the devices (say
  data=1 on a machine with 8) uses the first data * fsdp of them, on a single host.
  Axes are Auto: jax 0.10 made Explicit the default for make_mesh, and the train step
  relies on XLA propagating the shardings of its inputs rather than typing each op.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if fsdp < 1 or n % fsdp:
    raise ValueError(f"mesh.fsdp={fsdp} must be a positive divisor of the {n} devices")
  if data == -1:
    data = n // fsdp
  if data < 1 or data * fsdp > n or (data * fsdp < n and jax.process_count() > 1):
    raise ValueError(f"mesh.data * mesh.fsdp = {data} * {fsdp} must be at most the {n}"
                     " devices (and equal to it across several hosts); mesh.data=-1 uses"
                     " all devices that fsdp leaves")
  auto = (jax.sharding.AxisType.Auto,) * 2
  return jax.make_mesh((data, fsdp), BATCH_AXES, axis_types=auto,
                       devices=devices[:data * fsdp])


def batch_sharding(mesh) -> NamedSharding:
  """Leading (batch) axis split over every device of the mesh."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def fsdp_spec(shape: Sequence[int], fsdp: int) -> P:
  """Splits the largest dimension divisible by `fsdp`; replicates if none is."""
  if fsdp == 1:
    return P()
  candidates = [d for d in np.argsort(shape)[::-1] if shape[d] % fsdp == 0 and shape[d] >= fsdp]
  if not candidates:
    return P()
  spec = [None] * len(shape)
  spec[int(candidates[0])] = "fsdp"
  return P(*spec)


def tree_shardings(mesh, abstract_tree):
  """A NamedSharding for each leaf of `abstract_tree` (arrays or ShapeDtypeStructs)."""
  fsdp = mesh.shape["fsdp"]
  return jax.tree.map(lambda x: NamedSharding(mesh, fsdp_spec(x.shape, fsdp)), abstract_tree)


def global_batch(local_batch: dict, mesh) -> dict:
  """This host's part of a batch (numpy) as global arrays split over the mesh."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, np.asarray(v))
          for k, v in local_batch.items()}


def put_global(host_tree, shardings):
  """Host values that every process holds whole (numpy) as global arrays laid out as `shardings`.

  jax.device_put only reaches this process's devices; across processes each one must
  supply the shards of its own devices, which make_array_from_callback asks for.
  """
  def put(value, sharding):
    value = np.asarray(value)
    return jax.make_array_from_callback(value.shape, sharding, lambda index: value[index])
  return jax.tree.map(put, host_tree, shardings)


def replicated_key(key: jax.Array, mesh) -> jax.Array:
  """The PRNG `key` replicated over every device of `mesh`, this process's or not.

  The key travels as its raw words (numpy, the same in every process), which jit
  accepts as a replicated input across processes where device_put would not.
  """
  words = np.asarray(jax.random.key_data(key))
  impl = jax.random.key_impl(key)
  return jax.jit(lambda w: jax.random.wrap_key_data(w, impl=impl),
                 out_shardings=replicated(mesh))(words)
