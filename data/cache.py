"""What hvdtrain keeps about shards it did not write and cannot write beside: indexes of
read-only tars, per-shard label and member counts, `data.verify` results and the good
samples of `--data.on_error=skip`.

Root: `$HVDTRAIN_CACHE/data/v1/` (default `~/.cache/hvdtrain/`, the root the Horovod wheel
uses too). Everything is keyed by a tar's *signature*: its size and the sha256 of a few
blocks spread over it (its first and last 4 KiB, where its first and last headers are, and
eight 512-byte blocks between). A copy keeps it (rsync, cp, a read-only bind mount); a
tar written again with other samples changes it. Computing it reads ~12 KiB per tar.
Records are written atomically (temporary name, rename), so ranks and nodes that share
the folder never read half a file; `lock()` lets one process per node build what is
missing while the others wait for it.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import time

from data.tarindex import write_atomic

VERSION = "v1"
_SIG_CACHE: dict[tuple, str] = {}


def root() -> str:
    base = os.environ.get("HVDTRAIN_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "hvdtrain")
    return os.path.join(base, "data", VERSION)


def path(kind: str, name: str) -> str:
    d = os.path.join(root(), kind)
    os.makedirs(d, exist_ok=True)
    return os.path.join(d, name)


def signature(tar: str) -> str:
    """Content key of a tar: size + sha256 of its first and last 4 KiB and 8 blocks between.
    Remembered per (path, size, mtime, inode) for the life of the process."""
    st = os.stat(tar)
    memo = (os.path.abspath(tar), st.st_size, st.st_mtime_ns, st.st_ino)
    if memo in _SIG_CACHE:
        return _SIG_CACHE[memo]
    size, h = st.st_size, hashlib.sha256(str(st.st_size).encode())
    with open(tar, "rb") as f:
        fd = f.fileno()
        h.update(os.pread(fd, 4096, 0))
        for k in range(1, 9):
            h.update(os.pread(fd, 512, size * k // 9 // 512 * 512))
        h.update(os.pread(fd, 4096, max(0, size - 4096)))
    sig = h.hexdigest()[:32]
    _SIG_CACHE[memo] = sig
    return sig


def read_json(p: str) -> dict | None:
    try:
        with open(p) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None  # missing, or written by an older version: built again


def write_json(p: str, data: dict) -> None:
    write_atomic(p, json.dumps(data, separators=(",", ":")).encode())


def write_text(p: str, text: str) -> None:
    write_atomic(p, text.encode("utf-8", "surrogateescape"))


@contextlib.contextmanager
def lock(name: str, log=None, what: str = "building"):
    """An exclusive lock on `locks/<name>.lock` in the cache (flock: released if its holder
    dies). A process that has to wait says once who holds it."""
    p = path("locks", f"{name}.lock")
    fd = os.open(p, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "another process"
            if log:
                log(f"data: waiting for {holder} ({what}; lock {p})")
            t0 = time.monotonic()
            fcntl.flock(fd, fcntl.LOCK_EX)
            if log:
                log(f"data: {holder} finished after {time.monotonic() - t0:.1f} s")
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}".encode(), 0)
        yield
    finally:
        os.close(fd)  # closing the descriptor releases the lock
