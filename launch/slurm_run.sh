#!/usr/bin/env bash
# The body of every launch/*.sbatch: Slurm allocation -> Horovod launch of one module.
#
#   launch/slurm_run.sh MODULE [--preset NAME] [--section.key=value ...]
#
# Knobs (environment): LAUNCHER=horovodrun|srun (default horovodrun), DRY_RUN=1 (print
# the command and environment, run nothing), HVDTRAIN_ROOT (repository; default: the
# submit directory), HVDTRAIN_PYTHON (default: .venv/bin/python). Holds no hyperparameters.
set -euo pipefail
ROOT=${HVDTRAIN_ROOT:-${SLURM_SUBMIT_DIR:-$(pwd)}}
cd "$ROOT"
export HVDTRAIN_PYTHON=${HVDTRAIN_PYTHON:-$ROOT/.venv/bin/python}
[[ -x "$HVDTRAIN_PYTHON" ]] || { echo "slurm_run: no Python at $HVDTRAIN_PYTHON (run make setup, or set HVDTRAIN_PYTHON)" >&2; exit 2; }
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
MODULE=$1; shift
LAUNCHER=${LAUNCHER:-horovodrun}
export LAUNCHER

ARGS=("$@")
# every job records its id: the run folder is runs/slurm-<job id> unless one is given
if [[ -n "${SLURM_JOB_ID:-}" && "$MODULE" == hvdtrain.* ]] && ! printf '%s\n' "${ARGS[@]}" | grep -q -- '^--run.dir'; then
    ARGS+=("--run.dir=runs/slurm-${SLURM_JOB_ID}")
fi
CMD=$("$HVDTRAIN_PYTHON" -m launch.slurm command "$MODULE" "${ARGS[@]}")

echo "slurm_run: job ${SLURM_JOB_ID:-none} on ${SLURM_JOB_NODELIST:-?} (${SLURM_TASKS_PER_NODE:-?} tasks/node), launcher $LAUNCHER"
if [[ "${DRY_RUN:-0}" == 1 ]]; then
    echo "DRY_RUN: cd $ROOT"
    env | grep -E '^(SLURM_(JOB_ID|JOB_NODELIST|NTASKS|TASKS_PER_NODE|NTASKS_PER_NODE|CPUS_PER_TASK)|HVDTRAIN_|LAUNCHER|PYTHONPATH|CUDA_VISIBLE_DEVICES)=' | sort | sed 's/^/DRY_RUN: env /'
    echo "DRY_RUN: $CMD"
    exit 0
fi

if [[ "$LAUNCHER" == srun ]]; then
    # Gloo rendezvous for ranks started by srun: a server in this batch step, stopped at exit
    exec 3< <("$HVDTRAIN_PYTHON" -m launch.slurm rendezvous)
    RDV_PID=$!
    trap 'kill $RDV_PID 2>/dev/null || true' EXIT
    read -r -t 60 PORT <&3 || { echo "slurm_run: the rendezvous server did not start" >&2; exit 2; }
    export HOROVOD_GLOO_RENDEZVOUS_ADDR=${HOROVOD_GLOO_RENDEZVOUS_ADDR:-$(hostname)} HOROVOD_GLOO_RENDEZVOUS_PORT=$PORT
fi
echo "slurm_run: $CMD"
if [[ "$LAUNCHER" == srun ]]; then eval "$CMD"; else eval "exec $CMD"; fi
