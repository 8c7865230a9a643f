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

Nothing in it is needed: a pruned record is built again when a run needs it. A record
that is used gets its mtime refreshed (at most once a day), so what runs still read is
what `prune` keeps:

    python -m data.cache                        # what it holds, by kind: files, MB, oldest use
    python -m data.cache prune --older-than 30  # remove what no run used in 30 days [--dry-run]
"""
from __future__ import annotations

import argparse
import contextlib
import fcntl
import hashlib
import json
import os
import sys
import time

from hvdtrain.data.files import write_atomic

VERSION = "v1"
KINDS = ("indexes", "shards", "verify", "skip")  # records; `prune` also clears old `jobs` specs
USED_EVERY_S = 86400  # `used()` writes an mtime at most once a day per file
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
    Remembered per (path, size, mtime, inode) for the life of the process. A tar in a
    bucket is keyed by its URL, size and ETag/generation as listed (`data.remote.Obj.sig`)."""
    if tar.startswith(("s3://", "gs://")):
        from hvdtrain.data import remote

        return remote.known(tar).sig
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


def used(p: str) -> None:
    """Mark a record as used now (its mtime, at most once a day): `prune` keeps it."""
    try:
        if time.time() - os.stat(p).st_mtime > USED_EVERY_S:
            os.utime(p)
    except OSError:
        pass  # gone (pruned meanwhile: built again when needed) or not this user's to touch


def read_json(p: str) -> dict | None:
    try:
        with open(p) as f:
            data = json.load(f)
    except (OSError, ValueError):
        return None  # missing, or written by an older version: built again
    used(p)
    return data


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


# ---------------------------------------------------------------- show, prune
def _files(kinds=KINDS + ("jobs",)):
    for kind in kinds:
        d = os.path.join(root(), kind)
        try:
            names = os.listdir(d)
        except FileNotFoundError:
            continue
        for n in names:
            p = os.path.join(d, n)
            try:
                st = os.stat(p)
            except FileNotFoundError:
                continue
            yield kind, p, st


def summary() -> dict:
    """{kind: {files, bytes, oldest_days}} of the records in the cache."""
    now, out = time.time(), {}
    for kind, _, st in _files():
        k = out.setdefault(kind, {"files": 0, "bytes": 0, "oldest_days": 0.0})
        k["files"] += 1
        k["bytes"] += st.st_size
        k["oldest_days"] = max(k["oldest_days"], round((now - st.st_mtime) / 86400, 1))
    return out


def prune(older_than_days: float, dry_run: bool = False) -> tuple[int, int]:
    """Remove records no run used in `older_than_days` days: (files, bytes). A run that
    needs one builds it again. Lock files stay (a waiter may hold one open; they are empty)."""
    cutoff, files, size = time.time() - older_than_days * 86400, 0, 0
    for _, p, st in _files():
        if st.st_mtime < cutoff:
            if not dry_run:
                try:
                    os.remove(p)
                except FileNotFoundError:
                    continue
            files, size = files + 1, size + st.st_size
    return files, size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m data.cache", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd")
    pr = sub.add_parser("prune", help="remove records no run used in DAYS days")
    pr.add_argument("--older-than", type=float, required=True, metavar="DAYS")
    pr.add_argument("--dry-run", action="store_true", help="say what would go, remove nothing")
    a = ap.parse_args(argv)
    if a.cmd == "prune":
        if a.older_than < 0:
            ap.error("--older-than must be 0 or more days")
        n, b = prune(a.older_than, a.dry_run)
        verb = "would remove" if a.dry_run else "removed"
        print(f"data.cache: {verb} {n} record(s), {b / 1e6:.1f} MB unused for {a.older_than:g} day(s), from {root()}")
        return 0
    kinds = summary()
    print(f"data.cache: {root()}")
    if not kinds:
        print("  empty")
    for kind, k in sorted(kinds.items()):
        print(f"  {kind:8s} {k['files']:7d} file(s) {k['bytes'] / 1e6:9.1f} MB   oldest use {k['oldest_days']:g} day(s) ago")
    return 0


if __name__ == "__main__":
    sys.exit(main())
