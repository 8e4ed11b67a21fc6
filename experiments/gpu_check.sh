#!/usr/bin/env bash
# The GPU truth check, on one real GPU: ViT-L/16 at batch 128 and ViT-B/16 at batch 32,
# full / remat / razor@0.9, each in a fresh process. Per case it records the allocator's
# peak_bytes_in_use, the median step time, XLA's compiled peak and the modeled step time
# of the executable that ran (benchmarks/gpu_time.py); the README it writes puts them
# beside the figures compiled for an H200 without a GPU (results/benchmark.json's
# gpu-aot:h200 records), so the first GPU run validates both the deviceless compile and
# the time model (calibrate gpu_time.Constants from it). About 4 minutes on one H200;
# no case starts, and none runs on, past 270 s.
#
#   experiments/gpu_check.sh [OUT_DIR]      # default: $OUT if set, else results/gpu
#   DTYPE=bfloat16 experiments/gpu_check.sh # compute dtype (default float32); one per run
#
# Writes OUT_DIR/benchmark.json (records with backend "gpu", same format as
# results/benchmark.json), README.md and the plots. Add them to the committed results:
#   python experiments/benchmark.py --merge OUT_DIR/benchmark.json
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-results/gpu}}"
dtype="${DTYPE:-float32}"
python="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then python=.venv/bin/python; fi

"$python" - <<'PY'
import jax
backend = jax.default_backend()
print("backend:", backend, jax.devices())
if backend != "gpu":
  raise SystemExit("gpu_check.sh needs a GPU backend (pip install -e '.[cuda]'); got " + backend)
PY

# The README's side-by-side columns come from the committed gpu-aot records: start
# from them (this run's records replace nothing of theirs: another backend).
mkdir -p "$out"
if [ ! -e "$out/benchmark.json" ] && [ -e results/benchmark.json ]; then
  cp results/benchmark.json "$out/benchmark.json"
fi

# Allocate on demand (peak_bytes_in_use counts what is in use either way), so the
# parent process, which only traces, holds no GPU memory while a case runs; and let a
# case use nearly all of it: full fine-tuning of ViT-L/16 at batch 128 in float32
# compiles to about 103 GiB.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
"$python" experiments/benchmark.py --gpu --dtype "$dtype" --deadline 270 --out "$out"
