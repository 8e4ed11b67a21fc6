#!/usr/bin/env bash
# ViT-B/16 and ViT-L/16 at batch 128 on one GPU: full / remat / razor@0.9, each in a
# fresh process (device peak_bytes_in_use, compiled peak, median step time; ratios to
# full), bfloat16 compute with float32 params. About 3-5 minutes on one H200.
#
#   experiments/gpu_check.sh [OUT_DIR]      # default: $OUT if set, else results/gpu
#
# Writes OUT_DIR/benchmark.json (records with backend "gpu", same format as
# results/benchmark.json), README.md and the plots. Add them to the committed results:
#   python experiments/benchmark.py --merge OUT_DIR/benchmark.json
set -euo pipefail
cd "$(dirname "$0")/.."
out="${1:-${OUT:-results/gpu}}"
python="${PYTHON:-python}"
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ]; then python=.venv/bin/python; fi

"$python" - <<'PY'
import jax
backend = jax.default_backend()
print("backend:", backend, jax.devices())
if backend != "gpu":
  raise SystemExit("gpu_check.sh needs a GPU backend (pip install -e '.[cuda]'); got " + backend)
PY

# Allocate on demand (peak_bytes_in_use counts what is in use either way), so the
# parent process, which only traces, holds no GPU memory while a case runs; and let a
# case use nearly all of it: full fine-tuning of ViT-L/16 at batch 128 is large.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}"
# No case starts, and none runs on, past 270 s: the whole check stays within 5 minutes.
"$python" experiments/benchmark.py --gpu --dtype bfloat16 --deadline 270 --out "$out"
