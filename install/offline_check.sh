#!/usr/bin/env bash
# The one command on a GPU node without internet access (docs/gpu-check.md): set up .venv
# from the bundle copied into .gpu-bundle/ (install/offline_install.sh), then run the GPU
# node check (`python -m gpucheck`), both writing into one folder.
#
#   install/offline_check.sh [--out DIR] [--budget-s S] [GPUCHECK_ARGS...]
#       --out DIR        the report folder (default runs/gpu-check-<date>-<time> in the
#                        checkout): setup.log, then gpu-check.md, gpu-check.json,
#                        gpu-check-logs.txt (every log's tail), one log and the data of every
#                        stage; the report is rewritten after every stage
#       --budget-s S     end set-up and the check together within S seconds (what is left of
#                        the node's time, e.g. a job's limit): the check gets what set-up left
#                        and names the stages it had no time for; default: no limit
#       GPUCHECK_ARGS    more arguments for gpucheck, e.g. --only sanity,train or
#                        --copy-to /shared/node-a (a flat copy of the report)
#
# A horovod build started earlier with `install/offline_install.sh --horovod` is waited
# for and its wheel reused. Exit: set-up's on failure (its log's tail printed), else
# gpucheck's (0 every target passed, 1 a failure, 2 no GPU).
set -uo pipefail
CALLER=$PWD
cd "$(dirname "$0")/.."

DEST="" BUDGET="" ARGS=()
while (($#)); do
    case "$1" in
        --out) DEST=${2:?--out needs a folder}; [[ "$DEST" == /* ]] || DEST=$CALLER/$DEST; shift 2 ;;
        --budget-s) BUDGET=${2:?--budget-s needs seconds}; shift 2 ;;
        *) ARGS+=("$1"); shift ;;
    esac
done
[[ -z "$BUDGET" || "$BUDGET" =~ ^[0-9]+$ ]] || { echo "gpu_offline_check: --budget-s takes whole seconds, not '$BUDGET'" >&2; exit 1; }
DEST=${DEST:-runs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$DEST"
echo "gpu_offline_check: set-up (install/offline_install.sh), log $DEST/setup.log"
if ! install/offline_install.sh >"$DEST/setup.log" 2>&1; then
    echo "gpu_offline_check: set-up failed after ${SECONDS} s; the end of its log:"
    tail -n 40 "$DEST/setup.log"
    exit 1
fi
grep -E "^setup: torch|reusing cached wheel|waiting for it|installed horovod" "$DEST/setup.log"
echo "gpu_offline_check: set-up took ${SECONDS} s"
if [[ -n "$BUDGET" ]]; then
    LEFT=$((BUDGET - SECONDS))
    echo "gpu_offline_check: gpu-check gets the ${LEFT} s left of --budget-s $BUDGET"
    ((LEFT >= 60)) || { echo "gpu_offline_check: under 60 s left: gpu-check not started"; exit 1; }
    ARGS=(--budget-s "$LEFT" "${ARGS[@]}")
fi
exec .venv/bin/python -m gpucheck --out "$DEST" "${ARGS[@]}"
