#!/usr/bin/env bash
# Fine-tunes as N processes on this machine, one jax.distributed run (see README, "Several hosts").
#
#   experiments/launch_local.sh N --config demo [--config.FIELD=VALUE ...] [--workdir DIR]
#   DEVICES_PER_PROCESS=2 experiments/launch_local.sh 2 --config demo   # CPU: 2 devices each
#
# Sets JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID for each process,
# forwards SIGINT/SIGTERM (a SIGTERM saves a checkpoint and stops), and exits non-zero
# if any process fails, leaving none behind (razor_jax/train/launch.py). PYTHON picks
# the interpreter (default: python).
set -euo pipefail
if [[ $# -lt 1 || ! $1 =~ ^[1-9][0-9]*$ ]]; then
  echo "usage: $0 N --config NAME [--config.FIELD=VALUE ...] [--workdir DIR]  (N processes)" >&2
  exit 2
fi
n=$1
shift
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
python=${PYTHON:-python}
exec "$python" -m razor_jax.train.launch -n "$n" \
  ${DEVICES_PER_PROCESS:+--devices_per_process "$DEVICES_PER_PROCESS"} \
  -- "$python" "$here/finetune.py" "$@"
