"""How a command ends: the one table of exit codes, for every entry point (`hvdtrain.train`,
`.sanity`, `.evaluate`, `.export`, the benches), and `Refused`, the exception that ends a
command with REFUSED. launch/slurm_run.sh requeues a training run that ends PREEMPTED.

    python -m hvdtrain.exits      # the table
"""
from __future__ import annotations

OK = 0
FAILED = 1
REFUSED = 2
STALLED = 3
PREEMPTED = 4

MEANING = {
    OK: "done (the sanity: GO; export: written)",
    FAILED: "failed while running: non-finite loss, val-loss guard, bad sample, checkpoint write; "
            "the sanity's NO-GO (an SLO failed)",
    REFUSED: "refused to start: usage, data, classes, run-folder lock, resume checks, a bad checkpoint to "
             "evaluate or export",
    STALLED: "another rank stopped or hung: a failed collective, or the watchdog (hvdtrain.watchdog)",
    PREEMPTED: "preempted: every rank stopped at one step, rank 0 checkpointed there and wrote preempted.json; "
               "continue with --resume auto (hvdtrain.preempt; a run without checkpoints, the sanity, cannot be "
               "resumed: run it again)",
}


class Refused(RuntimeError):
    """The command must not start; the message says why and what to do. Ends it with REFUSED."""


def table() -> str:
    return "\n".join(f"{code}  {MEANING[code]}" for code in sorted(MEANING))


if __name__ == "__main__":
    print(table())
