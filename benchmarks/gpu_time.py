"""A modeled GPU step time, read from the optimized XLA:GPU HLO of a compiled step.

Where no GPU runs, the compiled module still says what one would execute: every kernel
(fusion, cuBLAS/cuDNN call, sort, copy, ...), every loop with its trip count, every
conditional. `estimate(hlo_text)` prices that program on a described GPU:

  arithmetic  a gemm or convolution at the tensor-core rate of its operand dtype (float32
              matmuls run as TF32 unless their precision is HIGHEST), any other kernel at
              the ALU rate over the elementwise / reduction / sort operations it fuses;
  bytes       every kernel reads its operands and writes its results at HBM bandwidth;
              a fused operand that is only sliced counts as the slice, the buffer a
              dynamic-update-slice writes into in place counts as the update;
  a kernel takes the larger of its arithmetic and its bytes (it is bound by one);
  launches    a fixed cost per kernel executed; loops multiply their bodies by their
              trip count (XLA's `known_trip_count`);
  round trips a fixed cost per conditional and per iteration of a loop whose trip count
              is unknown: the host reads the predicate (no CUDA-graph command buffer is
              assumed). Such a loop is counted as UNKNOWN_TRIP_COUNT iterations, and a
              conditional as its most expensive branch.

Nothing overlaps (no concurrent kernels, no launch hidden behind a running kernel), caches
are ignored (every byte comes from HBM) and the efficiencies are guesses: the figures are
for comparing the methods of one case, not absolute predictions. The constants are in one
place, `Constants`; calibrate them on the first real GPU run (experiments/gpu_check.sh
records measured step times beside these). Pure text processing: no jax, no plugin.
"""
from __future__ import annotations

import collections
import dataclasses
import math
import re
from typing import Optional


@dataclasses.dataclass(frozen=True)
class Constants:
  """What the model assumes of the GPU (an H200 SXM by default) and its runtime."""
  name: str = "h200"
  # Dense tensor-core peaks in TFLOP/s by operand dtype (float32 runs as TF32).
  tensor_tflops: tuple = (("f32", 494.7), ("bf16", 989.4), ("f16", 989.4))
  fp32_tflops: float = 66.9  # float32 matmuls at HIGHEST precision (no tensor cores)
  gemm_efficiency: float = 0.7  # of peak, for cuBLAS gemms of these sizes
  hbm_tbps: float = 4.8  # HBM3e bandwidth, TB/s
  hbm_efficiency: float = 0.8
  alu_tops: float = 33.5  # simple 32-bit ops/s: 132 SMs x 128 lanes x 1.98 GHz, in T/s
  alu_efficiency: float = 0.7
  launch_us: float = 4.0  # per kernel launched (stream launch, no CUDA graph)
  round_trip_us: float = 15.0  # per predicate the host must read (device -> host sync)
  unknown_trip_count: int = 16  # iterations assumed for a loop XLA cannot count

  def tensor_rate(self, dtype: str) -> float:
    return dict(self.tensor_tflops).get(dtype, self.fp32_tflops)


H200 = Constants()

BYTES_PER_ELEMENT = {"pred": 1, "s8": 1, "u8": 1, "s16": 2, "u16": 2, "f16": 2, "bf16": 2,
                     "s32": 4, "u32": 4, "f32": 4, "s64": 8, "u64": 8, "f64": 8, "s4": 0.5,
                     "u4": 0.5, "s2": 0.25, "u2": 0.25, "f8e4m3fn": 1, "f8e5m2": 1,
                     "token": 0, "c64": 8, "c128": 16}
# Instructions that launch nothing: bookkeeping, control flow (priced by their bodies),
# the asynchronous halves whose work is counted at their start.
NOT_KERNELS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while", "conditional",
    "call", "after-all", "add-dependency", "opt-barrier", "partition-id", "replica-id",
    "domain", "copy-done", "send-done", "recv-done", "all-reduce-done", "all-gather-done",
    "collective-permute-done"})
# Inside a fusion: data movement and layout, whose cost is the bytes, not arithmetic.
MOVES_ONLY = frozenset({
    "parameter", "constant", "bitcast", "broadcast", "reshape", "slice", "tuple",
    "get-tuple-element", "copy", "transpose", "iota", "concatenate", "pad", "dynamic-slice",
    "dynamic-update-slice", "gather", "scatter", "bitcast-convert"})

_SHAPE = re.compile(r"([a-z][a-z0-9]*)\[([0-9,]*)\]")
_HEADER = re.compile(r"^(ENTRY )?%?([\w.\-]+) .*\{\s*$")
_INSTRUCTION = re.compile(r"^\s+(ROOT )?%?([\w.\-]+) = (.*)$")
_OPCODE = re.compile(r"([a-z][a-z0-9\-]*)\((.*)$")
_TRIP_COUNT = re.compile(r'"known_trip_count":\{"n":"(\d+)"')


def shape_bytes(type_text: str) -> float:
  """Bytes of every array in an HLO type, tuples included: "(f32[2,3], s8[4])" -> 28."""
  total = 0.0
  for dtype, dims in _SHAPE.findall(type_text):
    if dtype in BYTES_PER_ELEMENT:
      total += math.prod(int(d) for d in dims.split(",") if d) * BYTES_PER_ELEMENT[dtype]
  return total


def first_array(type_text: str) -> tuple[Optional[str], list[int]]:
  """(dtype, dims) of the first array in an HLO type; (None, []) if there is none."""
  m = _SHAPE.search(type_text or "")
  return (m.group(1), [int(d) for d in m.group(2).split(",") if d]) if m else (None, [])


@dataclasses.dataclass
class Instruction:
  name: str
  type: str  # the result's HLO type text
  op: str  # the opcode
  operands: list  # operand names
  attrs: str  # everything after the operand list
  root: bool


def _split_type(rest: str) -> tuple[str, str]:
  """("(f32[2], s8[4])", "custom-call(...)") from the text after "name = "."""
  if rest.startswith("("):
    depth = 0
    for i, c in enumerate(rest):
      depth += (c == "(") - (c == ")")
      if depth == 0:
        return rest[:i + 1], rest[i + 1:].lstrip()
  head, _, tail = rest.partition(" ")
  return head, tail


def _split_operands(text: str) -> tuple[str, str]:
  """The operand list (up to the closing parenthesis) and the attributes after it."""
  depth = 0
  for i, c in enumerate(text):
    if c in "({[":
      depth += 1
    elif c in ")}]":
      if depth == 0:
        return text[:i], text[i + 1:]
      depth -= 1
  return text, ""


def parse(text: str) -> tuple[dict[str, list[Instruction]], str]:
  """(computations by name, the entry computation's name) of an HLO module's text.

  Raises:
    ValueError: the text holds no ENTRY computation (not an HLO module's text).
  """
  computations, entry, current = {}, None, None
  for line in text.splitlines():
    if not line.strip():
      continue
    if not line[0].isspace():
      m = _HEADER.match(line)
      current = None
      if m:
        current = computations.setdefault(m.group(2), [])
        entry = m.group(2) if m.group(1) else entry
      continue
    m = _INSTRUCTION.match(line) if current is not None else None
    if not m:
      continue
    type_text, rest = _split_type(m.group(3))
    om = _OPCODE.match(rest)
    if not om:
      continue
    operands, attrs = _split_operands(om.group(2))
    current.append(Instruction(m.group(2), type_text, om.group(1),
                               re.findall(r"%([\w.\-]+)", operands), attrs, bool(m.group(1))))
  if entry is None:
    raise ValueError("no ENTRY computation in the text: expected the optimized HLO module of"
                     " a compiled step (compiled.as_text())")
  return computations, entry


def _called(attrs: str, key: str) -> Optional[str]:
  m = re.search(key + r"=%([\w.\-]+)", attrs)
  return m.group(1) if m else None


@dataclasses.dataclass
class Kernel:
  kind: str  # "gemm", "conv", "fusion", "sort", "custom:<target>" or the opcode
  bytes: float  # read + written, HBM
  flops: float = 0.0  # tensor-core work (gemm, conv)
  alu_ops: float = 0.0  # other arithmetic (elementwise, reductions, sorting networks)
  dtype: str = "f32"  # operand dtype of a gemm or conv
  highest: bool = False  # a float32 gemm at HIGHEST precision (no TF32)


def _elements(type_text: str) -> int:
  return math.prod(first_array(type_text)[1])


def _sort_ops(type_text: str) -> float:
  """Compare-exchanges of a bitonic sort along the last axis, 2 ops each."""
  dims = first_array(type_text)[1]
  steps = max(1, math.ceil(math.log2(max(dims[-1] if dims else 1, 2))))
  return math.prod(dims) * steps * (steps + 1) / 2 * 2


@dataclasses.dataclass
class Estimate:
  """The modeled step and what it executes (per step: loops multiplied out)."""
  time_s: float = 0.0
  arithmetic_s: float = 0.0  # kernels bound by arithmetic: their arithmetic time
  bytes_s: float = 0.0  # kernels bound by memory: their bytes at HBM bandwidth
  launch_s: float = 0.0
  round_trip_s: float = 0.0
  launches: float = 0.0  # kernels executed
  round_trips: float = 0.0  # host reads of a predicate
  flops: float = 0.0  # tensor-core flops
  bytes: float = 0.0  # HBM bytes
  kinds: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  # In the program text (not multiplied out):
  fusions: int = 0
  while_loops: int = 0
  unknown_trip_loops: int = 0
  conditionals: int = 0

  def add(self, other: "Estimate"):
    for f in dataclasses.fields(self):
      if f.name == "kinds":
        self.kinds.update(other.kinds)
      else:
        setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

  def to_json(self) -> dict:
    """The figures a benchmark record keeps (seconds, counts)."""
    return {"time_s": self.time_s, "arithmetic_s": self.arithmetic_s,
            "bytes_s": self.bytes_s, "launch_s": self.launch_s,
            "round_trip_s": self.round_trip_s, "launches": round(self.launches),
            "round_trips": round(self.round_trips), "tflops": self.flops / 1e12,
            "hbm_gb": self.bytes / 1e9, "fusions": self.fusions,
            "while_loops": self.while_loops, "unknown_trip_loops": self.unknown_trip_loops,
            "conditionals": self.conditionals}


class Program:
  """A parsed HLO module, priced on the GPU that `constants` describe."""

  def __init__(self, text: str, constants: Constants = H200):
    self.constants = constants
    self.computations, self.entry = parse(text)
    self.types = {name: {i.name: i.type for i in body}
                  for name, body in self.computations.items()}

  # Bytes.
  def _fusion_bytes(self, instruction: Instruction) -> float:
    called = _called(instruction.attrs, "calls")
    body = self.computations.get(called, [])
    by_name = {i.name: i for i in body}
    users = collections.defaultdict(list)
    for i in body:
      for o in i.operands:
        users[o].append(i)
    root = next((i for i in body if i.root), None)
    outputs = [by_name[o] for o in root.operands if o in by_name] if (
        root is not None and root.op == "tuple") else [root]
    written, in_place = 0.0, set()
    for out in outputs:
      if out is None:
        continue
      if out.op == "dynamic-update-slice":
        # Written in place: only the update moves; the buffer is not read either.
        in_place.add(out.operands[0])
        written += shape_bytes(self.types[called].get(out.operands[1], ""))
      else:
        written += shape_bytes(out.type)
    read = sum(self._read_bytes(called, p.name, users, in_place)
               for p in body if p.op == "parameter")
    return read + written

  def _read_bytes(self, computation: str, name: str, users, in_place, depth: int = 0) -> float:
    """What a fused operand costs to read: its slices if it is only sliced, else all of it."""
    if name in in_place or not users.get(name):
      return 0.0
    whole = shape_bytes(self.types[computation][name])
    total = 0.0
    for u in users[name]:
      first = u.operands and u.operands[0] == name
      if u.op in ("slice", "dynamic-slice", "gather") and first:
        total += shape_bytes(u.type)
      elif u.op in ("bitcast", "reshape") and depth < 4:
        total += self._read_bytes(computation, u.name, users, in_place, depth + 1)
      elif u.op == "dynamic-update-slice" and first:
        continue
      else:
        return whole
    return min(total, whole)

  # Kernels.
  def kernel(self, computation: str, instruction: Instruction) -> Kernel:
    types = self.types[computation]
    op = instruction.op
    operand_bytes = lambda: sum(shape_bytes(types.get(o, "")) for o in instruction.operands)
    if op == "custom-call":
      m = re.search(r'custom_call_target="([^"]+)"', instruction.attrs)
      target = m.group(1) if m else ""
      # A library call's result is (output, workspace): only the output is written.
      output = _SHAPE.search(instruction.type)
      written = shape_bytes(output.group(0)) if output else 0.0
      if "cublas" in target:
        return self._gemm(types, instruction, operand_bytes() + written)
      if "cudnn" in target and "conv" in target.lower():
        return self._conv(types, instruction, operand_bytes() + written)
      return Kernel("custom:" + target, operand_bytes() + shape_bytes(instruction.type))
    if op == "fusion":
      called = _called(instruction.attrs, "calls")
      alu, sorts = 0.0, False
      for i in self.computations.get(called, []):
        if i.op == "sort":
          alu, sorts = alu + _sort_ops(i.type), True
        elif i.op in ("reduce", "reduce-window"):
          inputs = i.operands[:len(i.operands) // 2]
          alu += sum(_elements(self.types[called].get(o, "")) for o in inputs)
        elif i.op not in MOVES_ONLY:
          alu += _elements(i.type)
      return Kernel("sort" if sorts else "fusion", self._fusion_bytes(instruction), alu_ops=alu)
    if op == "sort":
      return Kernel("sort", 2 * shape_bytes(instruction.type), alu_ops=_sort_ops(instruction.type))
    return Kernel(op, operand_bytes() + shape_bytes(instruction.type))

  def _gemm(self, types, instruction, moved: float) -> Kernel:
    m = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', instruction.attrs)
    contracting = [int(x.strip().strip('"')) for x in (m.group(1) if m else "").split(",")
                   if x.strip()]
    dtype, lhs = first_array(types.get(instruction.operands[0], ""))
    depth = math.prod(lhs[d] for d in contracting) if contracting else 1
    flops = 2.0 * _elements(instruction.type) * depth
    return Kernel("gemm", moved, flops=flops, dtype=dtype or "f32",
                  highest='"HIGHEST"' in instruction.attrs)

  def _conv(self, types, instruction, moved: float) -> Kernel:
    arrays = [first_array(types.get(o, "")) for o in instruction.operands[:2]]
    arrays.append(first_array(instruction.type))
    sizes = sorted(math.prod(dims) for _, dims in arrays)
    labels = re.search(r"dim_labels=(\w+)_(\w+)->(\w+)", instruction.attrs)
    out_channels = 1
    if labels and "o" in labels.group(2) and len(arrays[1][1]) == len(labels.group(2)):
      out_channels = arrays[1][1][labels.group(2).index("o")]
    # MACs = output image x filter size / output channels ~ largest x smallest / o.
    flops = 2.0 * sizes[-1] * sizes[0] / max(1, out_channels)
    return Kernel("conv", moved, flops=flops, dtype=arrays[0][0] or "f32")

  def kernel_seconds(self, k: Kernel) -> tuple[float, float]:
    """(arithmetic seconds, bytes seconds) of one execution of `k`."""
    c = self.constants
    if k.kind in ("gemm", "conv"):
      rate = c.fp32_tflops if (k.highest and k.dtype == "f32") else c.tensor_rate(k.dtype)
      arithmetic = k.flops / (rate * 1e12 * c.gemm_efficiency)
    else:
      arithmetic = k.alu_ops / (c.alu_tops * 1e12 * c.alu_efficiency)
    return arithmetic, k.bytes / (c.hbm_tbps * 1e12 * c.hbm_efficiency)

  # The program.
  def _walk(self, computation: str, times: float) -> Estimate:
    c, est = self.constants, Estimate()
    for i in self.computations.get(computation, []):
      if i.op == "while":
        m = _TRIP_COUNT.search(i.attrs)
        est.while_loops += 1
        if m:
          trips = int(m.group(1))
        else:
          trips = c.unknown_trip_count
          est.unknown_trip_loops += 1
          est.round_trips += times * (trips + 1)  # the condition runs once more than the body
        est.add(self._walk(_called(i.attrs, "condition"), times * (trips + 1)))
        est.add(self._walk(_called(i.attrs, "body"), times * trips))
      elif i.op == "conditional":
        est.conditionals += 1
        est.round_trips += times
        branches = re.findall(r"(?:true_computation|false_computation)=%([\w.\-]+)", i.attrs)
        m = re.search(r"branch_computations=\{([^}]*)\}", i.attrs)
        if m:
          branches += re.findall(r"%([\w.\-]+)", m.group(1))
        priced = [self._walk(b, times) for b in branches]
        if priced:
          est.add(max(priced, key=lambda e: e.arithmetic_s + e.bytes_s + e.launch_s))
      elif i.op == "call":
        est.add(self._walk(_called(i.attrs, "to_apply"), times))
      elif i.op not in NOT_KERNELS:
        k = self.kernel(computation, i)
        arithmetic, moved = self.kernel_seconds(k)
        est.fusions += i.op == "fusion"
        est.launches += times
        est.flops += times * k.flops
        est.bytes += times * k.bytes
        if arithmetic >= moved:
          est.arithmetic_s += times * arithmetic
        else:
          est.bytes_s += times * moved
        est.launch_s += times * c.launch_us * 1e-6
        est.kinds[k.kind] += times
    return est

  def estimate(self) -> Estimate:
    est = self._walk(self.entry, 1)
    est.round_trip_s = est.round_trips * self.constants.round_trip_us * 1e-6
    est.time_s = est.arithmetic_s + est.bytes_s + est.launch_s + est.round_trip_s
    return est


def estimate(hlo_text: str, constants: Constants = H200) -> Estimate:
  """The modeled step of the optimized HLO module `hlo_text` (see the module docstring)."""
  return Program(hlo_text, constants).estimate()


def main(argv=None) -> int:
  """python -m benchmarks.gpu_time HLO_TEXT...: the modeled time of each dumped module."""
  import argparse  # pylint: disable=g-import-not-at-top
  parser = argparse.ArgumentParser(description=main.__doc__)
  parser.add_argument("paths", nargs="+")
  for path in parser.parse_args(argv).paths:
    with open(path, encoding="utf-8") as f:
      e = estimate(f.read())
    print(f"{path}: {e.time_s * 1e3:.2f} ms (arithmetic {e.arithmetic_s * 1e3:.2f}, bytes"
          f" {e.bytes_s * 1e3:.2f}, launches {e.launch_s * 1e3:.2f}, round trips"
          f" {e.round_trip_s * 1e3:.2f}); {e.launches:.0f} launches, {e.round_trips:.0f} round"
          f" trips, {e.fusions} fusions, {e.while_loops} loops ({e.unknown_trip_loops} of"
          f" unknown trip count), {e.conditionals} conditionals")
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
