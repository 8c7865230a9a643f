"""Files that several processes share: written atomically, and held by processes that may
have died.

    write_atomic(path, data)            # bytes or text; readers see the old file or the new one
    with atomic_file(path) as f: ...    # the same for a writer that streams (torch.save, a tar)

A file is written under a temporary name beside it, `<name>.tmp-<pid>-<thread>`, and
renamed over `path` when complete: ranks, nodes and threads that share a folder never read
half a file, and two writers of the same path never write into one temporary file (the
last rename wins, whole). A failed write removes its temporary file. `fsync=True` also
flushes the file and then its folder to disk (a checkpoint: a kill or a power loss leaves
the old file or the new one). Temporary names end in `.tmp-*`, so a sweep after a killed
writer finds them (`data.make_shards`).

`pid_alive(pid, start)` tells a lock's live holder from a dead one, `proc_start(pid)`
from a recycled pid.

This module is on the lowest floor (it imports nothing of hvdtrain's): `data/` and every
floor above it use it.
"""
from __future__ import annotations

import contextlib
import os
import threading


def temp_name(path: str) -> str:
    """A temporary name beside `path`, unique to this process and thread."""
    return f"{path}.tmp-{os.getpid()}-{threading.get_ident()}"


def fsync_dir(path: str) -> None:
    """Flush a folder's entries (a rename in it) to disk."""
    fd = os.open(path or ".", os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_file(path: str, mode: str = "wb", fsync: bool = False):
    """An open temporary file that replaces `path` when the block ends without an error
    (and is removed when it raises). `mode`: "wb" or "w"."""
    tmp = temp_name(path)
    try:
        with open(tmp, mode) as f:
            yield f
            if fsync:
                f.flush()
                os.fsync(f.fileno())
        os.replace(tmp, path)
        if fsync:
            fsync_dir(os.path.dirname(path))
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise


def write_atomic(path: str, data: bytes | bytearray | memoryview | str, fsync: bool = False) -> None:
    """Write `data` (text as UTF-8) to `path` atomically (see the module docstring)."""
    with atomic_file(path, "wb", fsync) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def proc_start(pid: int) -> str | None:
    """A process's start time in clock ticks (/proc/<pid>/stat field 22), None if it is
    gone: with the pid, it names one process (a pid is reused, its start time is not)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def pid_alive(pid: int, start: str | None = None) -> bool:
    """Whether process `pid` (on this host) lives; with `start` (proc_start's), whether it
    is still that process. A pid of another user's process counts as alive."""
    if pid <= 0:  # never os.kill(-1, ...): that addresses every process
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return start is None or proc_start(pid) in (None, start)
