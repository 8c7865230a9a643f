"""One rank's process, found in /proc, for the tests that kill, stop or throttle it.

`ps` cuts horovodrun's long `env HOROVOD_RANK=... python ...` command lines, and a rank
is told apart by its environment (HOROVOD_RANK, HOROVOD_HOSTNAME), so both are read from
/proc/<pid>/cmdline and /proc/<pid>/environ, whole arguments and whole NAME=value entries.
"""
from __future__ import annotations

import os


def _words(pid: str, what: str) -> list[bytes]:
    with open(f"/proc/{pid}/{what}", "rb") as f:
        return f.read().split(b"\0")


def pids(args=(), env=(), without=(), python: bool = False, among=None) -> list[int]:
    """Live processes whose command line holds every one of `args` and none of `without`
    as whole arguments, and whose environment holds every `NAME=value` of `env`.
    `python`: the program itself is python (not the shell or launcher that started it).
    `among`: look only at these pids (a network namespace's)."""
    found = []
    for pid in among if among is not None else filter(str.isdigit, os.listdir("/proc")):
        try:
            argv = _words(str(pid), "cmdline")
            environ = _words(str(pid), "environ") if env else []
        except OSError:
            continue  # gone meanwhile, or another user's
        if python and not argv[0].endswith(b"python"):
            continue
        if (all(a.encode() in argv for a in args) and not any(a.encode() in argv for a in without)
                and all(e.encode() in environ for e in env)):
            found.append(int(pid))
    return found


def rank_pid(module: str, run_dir: str, rank: int | None = None, env=()) -> int:
    """The python process of `python -m MODULE ... --run.dir=RUN_DIR` that is rank `rank`
    (HOROVOD_RANK) or matches `env`; AssertionError if there is none."""
    want = tuple(env) + ((f"HOROVOD_RANK={rank}",) if rank is not None else ())
    found = pids(args=(module, f"--run.dir={run_dir}"), env=want, python=True)
    assert found, f"no {module} process with {' '.join(want)} for {run_dir}"
    return found[0]
