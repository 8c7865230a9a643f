"""Checkpoint files: atomic save on rank 0, keep-last-N plus best, safe load, and the run
folder's pid lock. Which checkpoint a run continues from, and the checks that refuse one,
are `hvdtrain.resume`.

A checkpoint is `<run>/ckpt-<step:08d>.pt`, written under a temporary name, fsynced and
renamed, then the folder is fsynced (`data.files.write_atomic`): a kill at any moment
leaves either the old set or the old set plus a complete new file, never a half file
under a checkpoint's name.
`best.pt` is a hard link to the checkpoint with the lowest validation loss.

Files are read with `torch.load(weights_only=True)`: tensors, numbers, strings, bytes,
lists and dicts only, so loading a checkpoint cannot run code from it.
"""
from __future__ import annotations

import glob
import io
import json
import os
import platform
import re
import time

import torch

from hvdtrain.data import files

FORMAT = "hvdtrain-ckpt-v1"
_NAME = re.compile(r"ckpt-(\d{8})\.pt$")
LOCK_NAME = ".lock"


class CheckpointError(RuntimeError):
    """A checkpoint could not be written or read; the message names the file."""


class LockError(RuntimeError):
    """The run folder is in use by a live run."""


# ---------------------------------------------------------------- writing
def _atomic_save(payload: dict, path: str) -> None:
    buf = io.BytesIO()
    torch.save(payload, buf)  # in memory first: a failed file write then raises OSError with its
    try:                      # errno (ENOSPC, EFBIG), where torch.save's own writer only says "enforce fail"
        files.write_atomic(path, buf.getbuffer(), fsync=True)
    except (OSError, RuntimeError) as e:
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        prev = latest_path(os.path.dirname(path))
        keep = f"the previous checkpoint {prev} is intact" if prev else "no earlier checkpoint exists"
        raise CheckpointError(f"could not write checkpoint {path}: {reason}; {keep}. "
                              f"Free space in {os.path.dirname(path) or '.'} (or lower train.keep_last) "
                              f"and resume with --resume auto") from e


def non_finite(tensors: dict) -> list[str]:
    """Names of the floating-point tensors holding a NaN or an infinity (a host sync on a
    GPU; checkpoints sync anyway, to copy the weights out)."""
    return [k for k, v in tensors.items()
            if torch.is_tensor(v) and v.is_floating_point() and not bool(torch.isfinite(v).all())]


def save(run_dir: str, payload: dict, step: int, keep_last: int, best: bool = False) -> str:
    """Write `ckpt-<step>.pt` atomically, prune to the newest `keep_last`, link best.pt."""
    path = os.path.join(run_dir, f"ckpt-{step:08d}.pt")
    _atomic_save(payload, path)
    if best:
        best_path = os.path.join(run_dir, "best.pt")
        tmp = files.temp_name(best_path)
        if os.path.exists(tmp):
            os.remove(tmp)
        os.link(path, tmp)  # same inode: pruning ckpt-<step>.pt later leaves best.pt whole
        os.replace(tmp, best_path)
        files.fsync_dir(run_dir)
    for old in list_checkpoints(run_dir)[:-keep_last] if keep_last > 0 else []:
        os.remove(old)
    return path


# ---------------------------------------------------------------- reading
def list_checkpoints(run_dir: str) -> list[str]:
    """`ckpt-*.pt` in step order (temporary files are not checkpoints)."""
    found = [p for p in glob.glob(os.path.join(glob.escape(run_dir), "ckpt-*.pt")) if _NAME.search(p)]
    return sorted(found)


def latest_path(run_dir: str) -> str | None:
    found = list_checkpoints(run_dir)
    return found[-1] if found else None


def load(path: str) -> dict:
    """Read a checkpoint without executing anything from it (weights_only=True)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint {path} does not exist") from None
    except Exception as e:  # noqa: BLE001 - truncated zip, unpickling refusal, ...: all say "unreadable"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is unreadable: {first}") from e
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"checkpoint {path} is not an hvdtrain checkpoint ({FORMAT})")
    return payload


def resolve(path: str) -> tuple[str, str]:
    """(checkpoint file, why that one) for what a user named: a file as given, or a run
    folder's best.pt (the lowest val loss), else its newest ckpt-*.pt."""
    if not os.path.isdir(path):
        return path, "the file given"
    if os.path.exists(os.path.join(path, "best.pt")):
        return os.path.join(path, "best.pt"), "the run folder's best.pt: the lowest val loss"
    newest = latest_path(path)
    if newest is None:
        raise CheckpointError(f"run folder {path} holds no checkpoint (no best.pt, no ckpt-*.pt)")
    return newest, "the run folder's newest checkpoint; it has no best.pt"


# ---------------------------------------------------------------- the run folder's lock
class RunLock:
    """`<run>/.lock` holding this process's pid, host and start time (O_EXCL create).

    A live holder on this host refuses the second run; a dead holder's lock is taken
    over with a warning; a holder on another host cannot be checked and refuses."""

    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, LOCK_NAME)
        self.me = {"pid": os.getpid(), "host": platform.node(), "start": files.proc_start(os.getpid()),
                   "since": time.strftime("%Y-%m-%d %H:%M:%S")}
        self.held = False

    def acquire(self, log=print) -> None:
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._holder()
                if holder.get("host") != self.me["host"]:
                    raise LockError(f"run folder {os.path.dirname(self.path)} is locked by pid "
                                    f"{holder.get('pid')} on host {holder.get('host')} (since "
                                    f"{holder.get('since')}); if that run is dead, delete {self.path}")
                if files.pid_alive(int(holder.get("pid", -1)), holder.get("start")):
                    raise LockError(f"run folder {os.path.dirname(self.path)} is in use by a live run "
                                    f"(pid {holder['pid']} since {holder.get('since')}); wait for it, "
                                    f"stop it, or choose another --run.dir")
                log(f"warning: taking over the stale lock {self.path} of dead pid {holder.get('pid')} "
                    f"(since {holder.get('since')})")
                os.remove(self.path)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump(self.me, f)
            self.held = True
            return
        raise LockError(f"could not take {self.path}: another run is racing for it")

    def _holder(self) -> dict:
        try:
            with open(self.path) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {"pid": -1, "host": self.me["host"]}  # unreadable: treat as stale

    def release(self) -> None:
        if self.held and self._holder().get("pid") == self.me["pid"]:
            os.remove(self.path)
        self.held = False
