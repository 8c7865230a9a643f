"""The val pass: one pass over the whole val set, each sample counted exactly once across
ranks, reduced with one allreduce; and the checks that stop a run on the wrong data.
Training runs it every `train.eval_every` steps (`hvdtrain.session`); `python -m
hvdtrain.evaluate` runs it on a checkpoint.

Each rank reads its contiguous part of the val set (DALI shards by global sample index);
`pad_last_batch=True` gives every rank the same number of batches and the iterator's
PARTIAL policy drops the padding, so a val set that does not divide by ranks x batch is
still counted once. Loss sum, top-1, top-5 and count accumulate on the device and cross
the wire once, at the end.
"""
from __future__ import annotations

import contextlib
import math

import torch

from hvdtrain.data.shards import ShardSet
from hvdtrain import dist
from hvdtrain import task as TK


class DataMismatch(RuntimeError):
    """Train data, val data and model disagree about the classes."""


def check_classes(train: ShardSet, val: ShardSet | None, task: str, head: int | None) -> None:
    """Before the first step: train vs val classes, and both vs the model's head. `task`: the
    task's name; `head`: the model's class count (None: not built yet)."""
    if val is not None and train.num_classes and val.num_classes:
        if train.num_classes != val.num_classes:
            raise DataMismatch(f"train data {train.spec} has {train.num_classes} classes but val data {val.spec} "
                               f"has {val.num_classes} ({train.info_path} vs {val.info_path})")
        if train.classes and val.classes and train.classes != val.classes:
            diff = [(i, a, b) for i, (a, b) in enumerate(zip(train.classes, val.classes)) if a != b]
            raise DataMismatch(f"train data {train.spec} and val data {val.spec} name their classes differently "
                               f"(first differences, index: train vs val: {diff[:3]}); they were not built "
                               f"from the same class list")
    if TK.get(task).needs_classes and head is not None and train.num_classes and head != train.num_classes:
        raise DataMismatch(f"the model's head has {head} outputs but {train.spec} has {train.num_classes} classes")


def val_loss_problem(loss: float, bound: float | None, factor: float, k) -> str | None:
    """Why a val loss must stop the run, or None. A NaN or infinite loss always does (it
    compares False with any bound); the bound can be turned off with val_loss_bound=0."""
    if not math.isfinite(loss):
        return "is not finite"
    if bound is not None and loss > bound:
        return f"is above the bound {bound:.3g} ({factor} x ln({k}); train.val_loss_bound=0 turns this off)"
    return None


def evaluate(state, loader, autocast=contextlib.nullcontext, beat=None) -> dict:
    """Loss and accuracy over the whole val set on all ranks (one allreduce); the task
    says what they mean (`task.eval_sums`). `beat`: called per batch (the watchdog's sign
    of progress). A rank whose share of the set ends early gets no last batch: skipped."""
    cfg, model, task = state.cfg, state.model, state.task
    sums = torch.zeros(4, dtype=torch.float64, device=state.device)  # loss sum, top-1, top-5, count
    model.eval()
    with torch.no_grad():
        for b in loader.epoch_batches():
            if beat is not None:
                beat()
            if b.labels.numel() == 0:
                continue
            views = [v.to(state.device, non_blocking=True) for v in b.views]
            with autocast():
                sums += task.eval_sums(cfg, model, views, b.labels.to(state.device, non_blocking=True))
    model.train()
    total = dist.allreduce_sum(sums.cpu(), name="val_sums").tolist()  # one collective per val pass
    n = max(total[3], 1.0)
    return {"val_loss": total[0] / n, "val_top1": total[1] / n, "val_top5": total[2] / n,
            "val_samples": int(total[3])}


def describe_val(val: ShardSet) -> str:
    return (f"{val.spec} ({len(val.paths)} shard(s) {val.paths[0]} .. {val.paths[-1]}, {val.total} samples, "
            f"fingerprint {val.fingerprint})")
