"""benchmarks/gpu_time.py: the HLO parser and time model on a small hand-written module.

Every figure below is worked out by hand from the module's shapes, so a change in what
the model counts (a launch, a slice, a trip count, a round trip) shows up here.
"""
import dataclasses

import pytest

from benchmarks import gpu_time

# A gemm (cuBLAS, 64x128 @ 128x32), a fusion that reads a 256-element slice of a
# 4096-element operand, a loop of 10 known trips, a loop of unknown trip count and a
# conditional whose expensive branch runs one fusion.
HLO = r"""HloModule jit_step, is_scheduled=true, entry_computation_layout={(f32[64,128]{1,0})->f32[64,32]{1,0}}

%fused_add (p0: f32[1024], p1: f32[1024]) -> f32[1024] {
  %p0 = f32[1024]{0} parameter(0)
  %p1 = f32[1024]{0} parameter(1)
  ROOT %add.1 = f32[1024]{0} add(f32[1024]{0} %p0, f32[1024]{0} %p1)
}

%fused_slice (q0: f32[4096]) -> f32[256] {
  %q0 = f32[4096]{0} parameter(0)
  %s.1 = f32[256]{0} slice(f32[4096]{0} %q0), slice={[0:256]}
  ROOT %neg.1 = f32[256]{0} negate(f32[256]{0} %s.1)
}

%body (param: (s32[], f32[1024])) -> (s32[], f32[1024]) {
  %param = (s32[], f32[1024]{0}) parameter(0)
  %i = s32[] get-tuple-element((s32[], f32[1024]{0}) %param), index=0
  %x = f32[1024]{0} get-tuple-element((s32[], f32[1024]{0}) %param), index=1
  %f.1 = f32[1024]{0} fusion(f32[1024]{0} %x, f32[1024]{0} %x), kind=kLoop, calls=%fused_add
  ROOT %t = (s32[], f32[1024]{0}) tuple(s32[] %i, f32[1024]{0} %f.1)
}

%cond (param.1: (s32[], f32[1024])) -> pred[] {
  %param.1 = (s32[], f32[1024]{0}) parameter(0)
  %j = s32[] get-tuple-element((s32[], f32[1024]{0}) %param.1), index=0
  %c = s32[] constant(10)
  ROOT %lt = pred[] compare(s32[] %j, s32[] %c), direction=LT
}

%on_true (y: f32[1024]) -> f32[1024] {
  %y = f32[1024]{0} parameter(0)
  ROOT %f.2 = f32[1024]{0} fusion(f32[1024]{0} %y, f32[1024]{0} %y), kind=kLoop, calls=%fused_add
}

%on_false (y.1: f32[1024]) -> f32[1024] {
  ROOT %y.1 = f32[1024]{0} parameter(0)
}

ENTRY %main (a: f32[64,128], b: f32[128,32], v: f32[4096], w: f32[1024], p: pred[]) -> f32[64,32] {
  %a = f32[64,128]{1,0} parameter(0)
  %b = f32[128,32]{1,0} parameter(1)
  %v = f32[4096]{0} parameter(2)
  %w = f32[1024]{0} parameter(3)
  %p = pred[] parameter(4)
  %gemm = (f32[64,32]{1,0}, s8[4194304]{0}) custom-call(f32[64,128]{1,0} %a, f32[128,32]{1,0} %b), custom_call_target="__cublas$lt$matmul", backend_config={"gemm_backend_config":{"dot_dimension_numbers":{"lhs_contracting_dimensions":["1"],"rhs_contracting_dimensions":["0"],"lhs_batch_dimensions":[],"rhs_batch_dimensions":[]},"precision_config":{"operand_precision":["DEFAULT","DEFAULT"]}}}
  %sl = f32[256]{0} fusion(f32[4096]{0} %v), kind=kLoop, calls=%fused_slice
  %z = s32[] constant(0)
  %init = (s32[], f32[1024]{0}) tuple(s32[] %z, f32[1024]{0} %w)
  %known = (s32[], f32[1024]{0}) while((s32[], f32[1024]{0}) %init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"10"}}
  %unknown = (s32[], f32[1024]{0}) while((s32[], f32[1024]{0}) %init), condition=%cond, body=%body
  %branch = f32[1024]{0} conditional(pred[] %p, f32[1024]{0} %w, f32[1024]{0} %w), true_computation=%on_true, false_computation=%on_false
  ROOT %out = f32[64,32]{1,0} get-tuple-element((f32[64,32]{1,0}, s8[4194304]{0}) %gemm), index=0
}
"""

ADD_BYTES = 3 * 1024 * 4  # two operands read, one result written
COMPARE_BYTES = 4 + 4 + 1


def test_parse_finds_every_computation_and_the_entry():
  computations, entry = gpu_time.parse(HLO)
  assert entry == "main"
  assert set(computations) == {"fused_add", "fused_slice", "body", "cond", "on_true",
                               "on_false", "main"}
  gemm = next(i for i in computations["main"] if i.name == "gemm")
  assert (gemm.op, gemm.operands) == ("custom-call", ["a", "b"])
  assert gemm.type.startswith("(f32[64,32]")
  assert [i.root for i in computations["fused_slice"]] == [False, False, True]


def test_kernels_price_gemm_flops_and_sliced_reads():
  program = gpu_time.Program(HLO)
  main = {i.name: i for i in program.computations["main"]}
  gemm = program.kernel("main", main["gemm"])
  assert (gemm.kind, gemm.dtype, gemm.highest) == ("gemm", "f32", False)
  assert gemm.flops == 2 * 64 * 32 * 128
  # Operands and the result; not cuBLAS's workspace.
  assert gemm.bytes == (64 * 128 + 128 * 32 + 64 * 32) * 4
  sliced = program.kernel("main", main["sl"])
  assert sliced.kind == "fusion"
  assert sliced.bytes == 256 * 4 + 256 * 4  # the slice read, not the 4096-element operand
  assert sliced.alu_ops == 256  # the negate; the slice moves data only


def test_estimate_multiplies_loops_and_counts_round_trips():
  c = dataclasses.replace(gpu_time.H200, launch_us=1.0, round_trip_us=10.0)
  e = gpu_time.estimate(HLO, c)
  unknown = c.unknown_trip_count
  # gemm + sliced fusion + known loop (10 bodies, 11 conditions) + unknown loop
  # (16 bodies, 17 conditions) + the conditional's dearer branch (one fusion).
  assert e.launches == 2 + (10 + 11) + (unknown + unknown + 1) + 1
  assert e.round_trips == (unknown + 1) + 1
  assert (e.while_loops, e.unknown_trip_loops, e.conditionals) == (2, 1, 1)
  assert e.fusions == 4  # in the text: sl, the body's (once), the branch's
  expected_bytes = ((64 * 128 + 128 * 32 + 64 * 32) * 4 + 2 * 256 * 4
                    + (10 + unknown + 1) * ADD_BYTES + (11 + unknown + 1) * COMPARE_BYTES)
  assert e.bytes == pytest.approx(expected_bytes)
  assert e.flops == 2 * 64 * 32 * 128
  assert e.launch_s == pytest.approx(e.launches * 1e-6)
  assert e.round_trip_s == pytest.approx(e.round_trips * 10e-6)
  # Every kernel here is small: bound by its bytes, except none by arithmetic.
  assert e.bytes_s == pytest.approx(expected_bytes / (c.hbm_tbps * 1e12 * c.hbm_efficiency))
  assert e.time_s == pytest.approx(e.arithmetic_s + e.bytes_s + e.launch_s + e.round_trip_s)
  row = e.to_json()
  assert (row["launches"], row["round_trips"]) == (round(e.launches), round(e.round_trips))


def test_gemm_rate_follows_its_dtype():
  # A large gemm is bound by arithmetic: bf16 at twice the TF32 rate.
  big = (HLO.replace("f32[64,128]", "f32[8192,8192]").replace("f32[128,32]", "f32[8192,8192]")
         .replace("f32[64,32]", "f32[8192,8192]"))
  as_bf16 = big.replace("f32[8192,8192]", "bf16[8192,8192]")
  fp32, bf16 = gpu_time.estimate(big), gpu_time.estimate(as_bf16)
  assert fp32.flops == bf16.flops == 2 * 8192**3
  assert fp32.arithmetic_s == pytest.approx(
      2 * 8192**3 / (494.7e12 * gpu_time.H200.gemm_efficiency))
  assert bf16.arithmetic_s == pytest.approx(fp32.arithmetic_s / 2, rel=1e-3)
  highest = big.replace('"DEFAULT","DEFAULT"', '"HIGHEST","HIGHEST"')
  assert gpu_time.estimate(highest).arithmetic_s == pytest.approx(
      fp32.arithmetic_s * 494.7 / 66.9)


def test_not_an_hlo_module_is_refused():
  with pytest.raises(ValueError, match="ENTRY"):
    gpu_time.estimate("jaxpr { lambda ; a:f32[]. }")
