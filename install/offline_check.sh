#!/usr/bin/env bash
# The last device call of a GPU run (docs/gpu-runs.md): set up .venv from the carried bundle,
# then `make gpu-check`, both inside one call's limit, with the report in a flat folder.
#
#   install/offline_check.sh [LIMIT_S] [GPU_CHECK_ARGS...]
#       LIMIT_S          seconds the whole script may take (default 570: a 600 s call, less
#                        a margin for the files' way back)
#       GPU_CHECK_ARGS   more arguments for gpucheck (e.g. --only sanity,train)
#
# Writes to $OUT (the device call's folder; runs/gpu-out without one): setup.log, and after
# every step gpu-check.json, gpu-check.md and gpu-check-logs.txt (the tail of every step's
# log). The set-up waits for the horovod build that `install/offline_install.sh --horovod` started
# in the first call; what it took comes off gpu-check's budget. Exit: set-up's on failure
# (its log's tail printed), else gpu-check's (0 all passed, 1 a failure, 2 no GPU).
set -uo pipefail
cd "$(dirname "$0")/.."

LIMIT=${1:-570}
shift || true
DEST=${OUT:-runs/gpu-out}
mkdir -p "$DEST"
echo "gpu_setup_check: set-up (install/offline_install.sh), log $DEST/setup.log"
if ! install/offline_install.sh >"$DEST/setup.log" 2>&1; then
    echo "gpu_setup_check: set-up failed after ${SECONDS} s; the end of its log:"
    tail -n 40 "$DEST/setup.log"
    exit 1
fi
grep -E "^setup: torch|reusing cached wheel|waiting for it|installed horovod" "$DEST/setup.log"
LEFT=$((LIMIT - SECONDS))
echo "gpu_setup_check: set-up took ${SECONDS} s; gpu-check gets the ${LEFT} s left"
((LEFT >= 60)) || { echo "gpu_setup_check: under 60 s left: gpu-check not started"; exit 1; }
exec .venv/bin/python -m gpucheck --budget-s "$LEFT" --copy-to "$DEST" "$@"
