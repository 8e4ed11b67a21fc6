"""Devices for training: multi-host start-up, the ("data", "fsdp") mesh, and shardings.

The batch is split over both mesh axes. With fsdp > 1, each parameter (and the optimizer
state beside it) is split over the "fsdp" axis along its largest dimension that divides
evenly, and gathered by XLA where it is used; with fsdp = 1 everything is replicated.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

BATCH_AXES = ("data", "fsdp")

_distributed_started = False


def initialize_distributed() -> bool:
  """Starts jax.distributed when this process is one of several; True if it did.

  JAX_COORDINATOR_ADDRESS (with JAX_NUM_PROCESSES and JAX_PROCESS_ID) names the
  coordinator explicitly; under SLURM or Open MPI with several tasks jax finds it
  itself. Must run before anything touches a device.
  """
  global _distributed_started
  if _distributed_started:
    return True
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    num, pid = os.environ.get("JAX_NUM_PROCESSES"), os.environ.get("JAX_PROCESS_ID")
    jax.distributed.initialize(
        coordinator_address=os.environ["JAX_COORDINATOR_ADDRESS"],
        num_processes=int(num) if num else None, process_id=int(pid) if pid else None)
  elif (int(os.environ.get("SLURM_NTASKS", "1")) > 1
        or "OMPI_MCA_orte_hnp_uri" in os.environ):
    jax.distributed.initialize()
  else:
    return False
  _distributed_started = True
  return True


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
