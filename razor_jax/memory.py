"""Memory of compiled programs: what XLA will really allocate, not what the jaxpr suggests."""
from __future__ import annotations

import dataclasses

import jax


@dataclasses.dataclass(frozen=True)
class CompiledMemory:
  """Bytes from XLA's memory analysis of one compiled program."""
  argument_bytes: int
  output_bytes: int
  temp_bytes: int
  alias_bytes: int

  @property
  def peak_bytes(self) -> int:
    """Arguments + outputs + temporaries, less outputs that reuse (donated) arguments."""
    return self.argument_bytes + self.output_bytes + self.temp_bytes - self.alias_bytes


def compiled_memory(fn, *args, **kwargs) -> CompiledMemory:
  """XLA's memory analysis of `fn` compiled for `args`, or of an executable already compiled.

  Args:
    fn: a function (jitted here unless it already is), or what `.lower(...).compile()`
      returned (then no args).
    *args, **kwargs: arrays or `jax.ShapeDtypeStruct`s; nothing is executed.
  Raises:
    RuntimeError: where the backend gives no memory analysis.
  """
  if isinstance(fn, jax.stages.Compiled):
    compiled = fn
  else:
    jitted = fn if hasattr(fn, "lower") else jax.jit(fn)
    compiled = jitted.lower(*args, **kwargs).compile()
  analysis = compiled.memory_analysis()
  if analysis is None:
    raise RuntimeError(f"the {jax.default_backend()} backend gives no memory analysis")
  return CompiledMemory(argument_bytes=analysis.argument_size_in_bytes,
                        output_bytes=analysis.output_size_in_bytes,
                        temp_bytes=analysis.temp_size_in_bytes,
                        alias_bytes=analysis.alias_size_in_bytes)


def device_peak_bytes(device=None) -> int | None:
  """The device allocator's peak bytes in use (GPU/TPU), or None where it keeps none."""
  # This process's first device: another process's devices give no memory stats.
  device = device or jax.local_devices()[0]
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  return None if not stats else stats.get("peak_bytes_in_use")
