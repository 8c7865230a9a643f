"""Work across the cores this process may use: `imap` keeps the order of its items.

A pool is forked where that is safe, else spawned (the work functions live in importable
modules and take plain tuples); one worker, or one item, runs in this process, so
tracebacks stay simple.
`tick` paces progress lines: a line every PROGRESS_S seconds (a minute) in a log.
"""
from __future__ import annotations

import multiprocessing as mp
import os
import sys
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

T = TypeVar("T")
R = TypeVar("R")
PROGRESS_S = 60.0
_last = {"t": 0.0}


def cores() -> int:
    """Cores this process may run on (its CPU affinity: a Slurm allocation's, not the node's)."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def imap(fn: Callable[[T], R], items: Iterable[T], workers: int | None = None) -> Iterator[R]:
    """fn over items, results in item order, `workers` processes (default: every core)."""
    items = list(items)
    workers = min(workers or cores(), len(items))
    if workers <= 1:
        yield from map(fn, items)
        return
    with mp.get_context("fork" if fork_safe() else "spawn").Pool(workers) as p:
        yield from p.imap(fn, items, chunksize=max(1, len(items) // (workers * 16)))  # fewer round trips


def fork_safe() -> bool:
    """Whether forking this process is safe: no other thread. torch's and DALI's native
    threads do not show in `threading`, so a process that imported torch is not."""
    return threading.active_count() == 1 and "torch" not in sys.modules


def tick(t0: float, every_s: float = PROGRESS_S) -> bool:
    """True once every `every_s` seconds since `t0` (the first time after `every_s`)."""
    now = time.monotonic()
    if now - max(t0, _last["t"]) >= every_s:
        _last["t"] = now
        return True
    return False
