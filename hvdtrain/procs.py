"""Ending a job: a launcher and every process below it, at once.

    kill_tree(pid)      # horovodrun and its ranks (each in a session of its own), SIGKILLed

horovodrun starts each rank in a session of its own (its middleman calls setsid), so a
process-group kill is not enough, and a rank that outlives its launcher sees SIGTERM or
a broken stdout pipe and may clean up. The GPU node check ends a step that ran out of
time with it, and the tests end a job they time out or kill -9 on purpose.
"""
from __future__ import annotations

import os
import signal


def process_tree(pid: int) -> list:
    """The process and every process below it (psutil.Process objects), [] if it is gone."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        return procs + procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def kill_tree(pid: int, procs: list | None = None) -> None:
    """SIGKILL a launcher and every process below it at once (frozen first, so no rank
    reacts to another's death), then its process group. `procs`: a tree taken earlier
    (processes a launcher left behind when it exited are no longer its children)."""
    import psutil

    procs = {p.pid: p for p in (procs or []) + process_tree(pid)}.values()
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for proc in procs:
            try:
                if proc.is_running():  # the same process (pid and start time), not a reused pid
                    proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
