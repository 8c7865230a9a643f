"""Start-up and resume, the one home of the resume policy: the run folder and its lock,
which checkpoint to continue from (`find_resume`), the checks that refuse it (this run's
config hash and data fingerprints: `check_provenance`; its head's classes), each rank's
share of it, and writing checkpoints (`save_checkpoint`). A refusal is `exits.Refused`.
The files themselves (atomic save, safe load, the lock) are `hvdtrain.checkpoint`.

Decisions that only rank 0 can make (the folder, the lock, which checkpoint) are made
there and broadcast, so every rank starts, resumes or refuses together.
"""
from __future__ import annotations

import os
import time

import torch

from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import dist, logs, provenance
from hvdtrain import step as S
from hvdtrain import task as TK
from hvdtrain.exits import Refused


# ---------------------------------------------------------------- the policy: which checkpoint, and may it continue
def find_resume(run_dir: str, log=print) -> tuple[str, dict] | None:
    """The newest checkpoint in `run_dir` that loads; unreadable ones are reported and skipped."""
    for path in reversed(ckpt.list_checkpoints(run_dir)):
        try:
            return path, ckpt.load(path)
        except ckpt.CheckpointError as e:
            log(f"warning: skipping {e}")
    return None


def check_provenance(saved: dict, current: dict, anyway: bool) -> list[str]:
    """Compare a checkpoint's config hash and data fingerprints with this run's.
    Raises Refused naming both values unless `anyway`; returns the differences."""
    diffs = []
    if saved.get("config_hash") != current["config_hash"]:
        diffs.append(f"config hash {saved.get('config_hash')} (checkpoint) != {current['config_hash']} (this run)")
    for split, fp in current["data_fingerprint"].items():
        old = saved.get("data_fingerprint", {}).get(split)
        if split != "train" and old is None:
            continue  # a val set added on resume: nothing to compare it with
        if old != fp:
            diffs.append(f"{split} data fingerprint {old} (checkpoint) != {fp} (this run)")
    if diffs and not anyway:
        raise Refused("refusing to resume: " + "; ".join(diffs) +
                      ". Pass --resume-anyway to continue on purpose, or start a fresh --run.dir")
    return diffs


# ---------------------------------------------------------------- start: folder, lock, resume
def _prepare_primary(cfg: C.Config, current: dict, num_classes: int | None, checkpoints: bool = True):
    """Rank 0: run folder, lock, and the checkpoint to resume from (checked). A run that
    writes no checkpoints (the sanity, a bench) takes the folder and its lock only."""
    if cfg.run.resume == "auto" and not cfg.run.dir:
        raise Refused("--resume auto needs --run.dir=FOLDER: the run folder to continue")
    run_dir = cfg.run.dir or os.path.join("runs", provenance.run_id(cfg.run.name))
    os.makedirs(run_dir, exist_ok=True)
    lock = ckpt.RunLock(run_dir)
    lock.acquire(log=logs.say)
    try:
        payload, path, notes = None, None, []
        if not checkpoints:
            pass
        elif cfg.run.resume == "auto":
            found = find_resume(run_dir, log=logs.say)
            if found is None:
                notes.append(f"resume: no checkpoint in {run_dir}: starting from step 0")
            else:
                path, payload = found
        elif cfg.run.resume:
            path, payload = cfg.run.resume, ckpt.load(cfg.run.resume)
        elif ckpt.list_checkpoints(run_dir):
            raise Refused(f"{run_dir} already holds checkpoints ({os.path.basename(ckpt.latest_path(run_dir))}); "
                          f"continue it with --resume auto, or choose another --run.dir")
        if payload is not None:
            diffs = check_provenance(payload["provenance"], current, cfg.run.resume_anyway)
            notes += [f"warning: --resume-anyway: {d}" for d in diffs]
            if TK.get(cfg.train.task).needs_classes and payload.get("num_classes") != num_classes:
                raise Refused(f"checkpoint {path} has a {payload.get('num_classes')}-class head but the data has "
                              f"{num_classes} classes")
            notes.append(f"resume: {path} (step {payload['step']}, epoch {payload['epoch']}, "
                         f"saved by {payload['world_size']} rank(s) at {payload['provenance']['git_sha'][:12]})")
    except (ckpt.CheckpointError, Refused):
        lock.release()
        raise
    return run_dir, lock, payload, path, notes


def prepare(cfg: C.Config, current: dict, num_classes: int | None, checkpoints: bool = True):
    """Every rank: (resume info, lock on rank 0 or None, checkpoint payload on rank 0)."""
    info, lock, payload = {"error": None}, None, None
    if dist.is_primary():
        try:
            run_dir, lock, payload, path, notes = _prepare_primary(cfg, current, num_classes, checkpoints)
            resume = None if payload is None else {k: payload[k] for k in ("step", "epoch", "world_size", "ranks",
                                                                              "best_val_loss")}
            info = {"error": None, "run_dir": run_dir, "resume": resume, "path": path, "notes": notes}
        except (ckpt.CheckpointError, ckpt.LockError, Refused) as e:
            info = {"error": str(e)}
    info = dist.broadcast_object(info, name="prepare")  # small: per-rank reader states, not weights
    if info["error"]:
        raise Refused(info["error"])
    return info, lock, payload


def restore_rank(info: dict) -> tuple[bytes | None, int, torch.Tensor | None, list[str]]:
    """This rank's loader state, epoch and mixup RNG state from the resume info."""
    r = info["resume"]
    if r is None:
        return None, 0, None, []
    if r["world_size"] != dist.size():
        return None, r["epoch"], None, [f"warning: the checkpoint was saved by {r['world_size']} rank(s), this run has "
                                  f"{dist.size()}: each reader restarts epoch {r['epoch']} from its start (samples "
                                  f"seen earlier in that epoch are seen again)"]
    mine = r["ranks"][dist.rank()]
    torch.set_rng_state(mine["torch_rng"])
    return mine.get("loader", mine.get("dali")), mine["epoch"], mine["gen"], []


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(state: S.TrainState, loader, run_dir: str, prov: dict, best_val: float | None,
                    best: bool) -> None:
    """Every rank hands rank 0 its reader and RNG state (one allgather); rank 0 writes;
    the outcome is broadcast so a failed write stops every rank."""
    mine = {"loader": loader.checkpoint(), "gen": state.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "epoch": loader.epoch}
    ranks = dist.allgather_object(mine, name="ckpt_ranks")
    err = None
    if dist.is_primary():
        # the losses are checked only every log_every steps: a diverged model must not be
        # saved in between, or --resume auto (and best.pt) would hand it back
        prev = ckpt.latest_path(run_dir)
        kept = f"the last good one is {prev}" if prev else "none before it"
        why = S.diverged(state, loader, f"checkpoint not saved ({kept})")
        if why:
            err = ("diverged", why)
    if dist.is_primary() and err is None:
        payload = {"format": ckpt.FORMAT, "step": state.step, "epoch": loader.epoch,
                   "model": state.model.state_dict(), "optimizer": state.opt.state_dict(),
                   "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                   "world_size": dist.size(), "ranks": ranks, "num_classes": state.num_classes,
                   "best_val_loss": best_val, "provenance": prov, "config": C.to_dict(state.cfg),
                   "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            ckpt.save(run_dir, payload, state.step, state.cfg.train.keep_last, best)
        except ckpt.CheckpointError as e:
            err = ("write", str(e))
    err = dist.broadcast_object(err, name="ckpt_status")
    if err:
        raise (S.TrainingError if err[0] == "diverged" else ckpt.CheckpointError)(err[1])
