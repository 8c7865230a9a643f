#!/usr/bin/env bash
# The same launch on a workstation: NP ranks on this machine.
#
#   launch/local.sh 2 hvdtrain.sanity --preset ci
#   DRY_RUN=1 launch/local.sh 4 hvdtrain.train --data.train=shards/train
set -euo pipefail
ROOT=$(cd "$(dirname "$0")/.." && pwd)
NP=${1:?usage: launch/local.sh NP MODULE [ARGS...]}; shift
MODULE=${1:?usage: launch/local.sh NP MODULE [ARGS...]}; shift
PY=${HVDTRAIN_PYTHON:-$ROOT/.venv/bin/python}
CMD=("$(dirname "$PY")/horovodrun" --gloo -np "$NP" -H "localhost:$NP" "$PY" -m "$MODULE" "$@")
if [[ "${DRY_RUN:-0}" == 1 ]]; then echo "DRY_RUN: cd $ROOT && ${CMD[*]}"; exit 0; fi
cd "$ROOT"
exec "${CMD[@]}"
