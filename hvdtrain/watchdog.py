"""Ends a rank that stops making progress, so the launcher ends the job instead of
letting it hang.

A rank that dies is the launcher's to see: horovodrun (and `srun --kill-on-bad-exit`)
ends the job when any process exits non-zero, in under a second. A rank that hangs
(stopped, stuck in I/O, a peer wedged in a collective) exits nothing, and Gloo waits in
the collective for a long time. The watchdog is a daemon thread: if the training loop
has not called `beat()` for `timeout_s`, it prints which rank, since when and after
what, and which peers it was waiting on, and ends the process at once with
`hvdtrain.exits.STALLED`; the launcher then ends the other ranks. A node that lost power
or its link looks exactly like this: no reset ever arrives, so only a timeout can tell.
"""
from __future__ import annotations

import os
import sys
import threading
import time

from hvdtrain import exits


class Watchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.last, self.what = time.monotonic(), "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.placement: list[dict] = []  # dist.placement(): the peers named when it fires

    def start(self) -> "Watchdog":
        if self.timeout_s > 0:
            self.beat("start")
            self._thread = threading.Thread(target=self._watch, name="hvdtrain-watchdog", daemon=True)
            self._thread.start()
        return self

    def beat(self, what: str) -> None:
        """Progress: `what` is said in the message if the next beat never comes."""
        self.last, self.what = time.monotonic(), what

    def stop(self) -> None:
        self._stop.set()

    def _watch(self) -> None:
        while not self._stop.wait(min(5.0, self.timeout_s / 4)):
            idle = time.monotonic() - self.last
            if idle > self.timeout_s:
                print(f"hvdtrain: rank {self.rank}: no progress for {idle:.0f} s after {self.what} "
                      f"(train watchdog, run.watchdog_s={self.timeout_s:g}). Another rank has probably died "
                      f"or hung, or a read is stuck; ending rank {self.rank} so the launcher ends the job. "
                      f"Resume with --resume auto.{peers_state(self.placement, self.rank)}", file=sys.stderr,
                      flush=True)
                os._exit(exits.STALLED)


def peers_state(placement: list[dict], me: int) -> str:
    """' Waiting on: rank 1 on h2 (another node: silent, its state cannot be seen from
    here); rank 2 on h1 (pid 7, stopped)' for the other ranks of `placement`. A peer on
    this node is looked up by pid (gone, stopped, running); one on another node is named
    as silent: in a collective that never completes every peer it waits on is."""
    mine = next((p["node"] for p in placement if p["rank"] == me), None)
    parts = []
    for p in placement:
        if p["rank"] == me:
            continue
        if p["node"] != mine:
            parts.append(f"rank {p['rank']} on {p['node']} (another node: silent, its state cannot be seen from here)")
            continue
        try:
            with open(f"/proc/{p['pid']}/stat") as f:
                state = {"T": "stopped", "t": "stopped", "Z": "exited"}.get(f.read().rsplit(")", 1)[1].split()[0],
                                                                          "running")
        except OSError:
            state = "exited"
        parts.append(f"rank {p['rank']} on {p['node']} (pid {p['pid']}, {state})")
    return f" Waiting on: {'; '.join(parts)}." if parts else ""
