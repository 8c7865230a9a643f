#!/usr/bin/env bash
# The body of every launch/*.sbatch: Slurm allocation -> Horovod launch of one module.
#
#   launch/slurm_run.sh MODULE [--preset NAME] [--section.key=value ...]
#
# Knobs (environment): LAUNCHER=horovodrun|srun (default horovodrun), DRY_RUN=1 (print
# the command and environment, run nothing), HVDTRAIN_ROOT (repository; default: the
# submit directory), HVDTRAIN_PYTHON (default: .venv/bin/python). Holds no hyperparameters.
#
# Preemption (hvdtrain/preempt.py): the launcher runs in the background while this shell
# waits, so the shell can take Slurm's warning (`#SBATCH --signal=B:USR1@90`, or
# `scancel --signal=USR1 --batch JOBID`; SIGTERM too): it writes <run dir>/preempt.request,
# which rank 0 reads, and keeps waiting. When hvdtrain.train stops for it (its ranks exit
# 4, PREEMPTED in hvdtrain/exits.py, after rank 0 wrote a checkpoint and preempted.json)
# on a USR1, this shell runs `scontrol requeue` and exits 0; the requeued job
# (SLURM_RESTART_COUNT > 0) continues with --resume auto in the same runs/slurm-<job id>.
# A stop on SIGTERM alone (scancel, the time limit) and any other module that was
# preempted exit 4, not requeued.
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
RUN_DIR=""
for ((i = 0; i < ${#ARGS[@]}; i++)); do
    case "${ARGS[i]}" in
        --run.dir=*) RUN_DIR=${ARGS[i]#--run.dir=} ;;
        --run.dir) RUN_DIR=${ARGS[i + 1]:-} ;;
    esac
done
if [[ -n "${SLURM_JOB_ID:-}" && "$MODULE" == hvdtrain.* && -z "$RUN_DIR" ]]; then
    RUN_DIR=runs/slurm-${SLURM_JOB_ID}
    ARGS+=("--run.dir=$RUN_DIR")
fi
# Slurm's warning can come at any time, even before the launcher starts (its timer may
# fire up to a minute early): USR1 is trapped from here on; rank 0 reads the request when it starts
REQUEST=${RUN_DIR:+$RUN_DIR/preempt.request}
request() {  # Slurm's warning: tell rank 0 through the run folder, then keep waiting
    echo "slurm_run: got SIG$1 at $(date +%T): asking the ranks to checkpoint and stop${REQUEST:+ ($REQUEST)}"
    [[ -n "$REQUEST" ]] && mkdir -p "$RUN_DIR" && echo "SIG$1 $(date +%FT%T)" > "$REQUEST"
    return 0
}
[[ -n "$REQUEST" ]] && rm -f "$REQUEST"  # an earlier run's request is not this one's
trap 'request USR1' USR1  # (SIGTERM before the launch still ends the job at once: scancel)
# a requeued training job continues where it stopped (unless told where to resume from)
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 && "$MODULE" == hvdtrain.train ]] \
        && ! printf '%s\n' "${ARGS[@]}" | grep -qE -- '^--(run\.)?resume(=|$)'; then
    ARGS+=(--resume auto)
    echo "slurm_run: restart ${SLURM_RESTART_COUNT} of job ${SLURM_JOB_ID}: continuing with --resume auto in $RUN_DIR"
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
STARTED=$(mktemp)
eval "exec $CMD" &  # the launcher itself, not a subshell that a SIGTERM to this step would end at once
LAUNCHER_PID=$!
trap 'request TERM' TERM
while kill -0 "$LAUNCHER_PID" 2>/dev/null; do wait "$LAUNCHER_PID" || true; done  # a trap ends a wait early
RC=0
wait "$LAUNCHER_PID" || RC=$?
trap - USR1 TERM
# preempted: the ranks exit 4 (horovodrun itself exits 1 and names the code), after rank 0
# wrote preempted.json, so that file, newer than this launch, is what says so. Only Slurm's
# warning (USR1) requeues: SIGTERM alone is scancel or the end of the time limit, and a
# cancelled job must stay cancelled (its checkpoint is there for a resume by hand)
if [[ $RC -ne 0 && -n "$RUN_DIR" && "$RUN_DIR/preempted.json" -nt "$STARTED" ]]; then
    rm -f "$STARTED"
    STEP=$(sed -n 's/^ *"step": \([0-9]*\).*/\1/p' "$RUN_DIR/preempted.json")
    if [[ "$MODULE" != hvdtrain.train ]]; then
        echo "slurm_run: $MODULE was preempted after step $STEP and is not resumable: not requeued; submit it again" >&2
    elif ! grep -q SIGUSR1 "$RUN_DIR/preempted.json"; then
        echo "slurm_run: stopped by SIGTERM (scancel, or the time limit with no warning) after step $STEP with a" \
             "checkpoint: not requeued; to continue, submit it again with --run.dir=$RUN_DIR --resume auto" >&2
    elif [[ -n "${SLURM_JOB_ID:-}" ]]; then
        echo "slurm_run: preempted after step $STEP; requeueing job $SLURM_JOB_ID: it continues with --resume auto in $RUN_DIR"
        if scontrol requeue "$SLURM_JOB_ID"; then exit 0; fi
        echo "slurm_run: scontrol requeue failed (is the job --no-requeue?); to continue, submit it again with" \
             "--run.dir=$RUN_DIR --resume auto" >&2
    fi
    exit 4
fi
rm -f "$STARTED"
[[ -n "$REQUEST" ]] && rm -f "$REQUEST"
exit "$RC"
