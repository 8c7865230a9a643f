"""`python -m hvdtrain.train`: one training run (the entry point; the run itself lives
in `hvdtrain.session`, the step and loop below it in `hvdtrain.step`).

    horovodrun -np 2 python -m hvdtrain.train --preset tinyimagenet \
        --data.train=shards/tiny/train --data.val=shards/tiny/val [--resume auto]

Exit codes: `hvdtrain.exits` (launch/train.sbatch requeues itself on PREEMPTED).
"""
from __future__ import annotations

import sys

from hvdtrain import preempt

if __name__ == "__main__":  # before the heavy imports below: a SIGUSR1 or SIGTERM during start-up
    preempt.install()       # is recorded (the run stops after step 1), not fatal

from hvdtrain import config as C  # noqa: E402
from hvdtrain import dist, exits, session  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    """Parse, start Horovod, run `session.fit`; the exit code (`hvdtrain.exits`)."""
    preempt.install()
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, _ = C.parse_args(argv, default_preset="sanity")
    except C.ConfigError as e:
        print(f"hvdtrain.train: {e}", file=sys.stderr)
        return exits.REFUSED
    dist.init()
    return session.main(cfg)


if __name__ == "__main__":
    preempt.leave(main())  # a late USR1 must not turn a finished run into a killed one
