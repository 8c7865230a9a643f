"""Ends a rank that stops making progress, so the launcher ends the job instead of
letting it hang.

A rank that dies is the launcher's to see: horovodrun (and `srun --kill-on-bad-exit`)
ends the job when any process exits non-zero — under a second here. A rank that hangs
(stopped, stuck in I/O, a peer wedged in a collective) exits nothing, and Gloo waits in
the collective for a long time. The watchdog is a daemon thread: if the training loop
has not called `beat()` for `timeout_s`, it prints which rank, since when and after
what, and calls `os._exit(3)`; the launcher then ends the other ranks.
"""
from __future__ import annotations

import os
import sys
import threading
import time

EXIT_STALLED = 3


class Watchdog:
    def __init__(self, timeout_s: float, rank: int):
        self.timeout_s, self.rank = timeout_s, rank
        self.last, self.what = time.monotonic(), "start"
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

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
                      f"Resume with --resume auto.", file=sys.stderr, flush=True)
                os._exit(EXIT_STALLED)
