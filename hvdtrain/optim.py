"""Optimizer, learning-rate scaling and schedule.

The peak lr follows the linear scaling rule (Goyal et al. 2017) when `optim.lr_ref_batch`
is set: lr x global batch / lr_ref_batch, where global batch = batch_size x ranks x
grad_accum_steps (the images behind one optimizer step). The schedule is a multiplier
of the peak: linear warm-up from 0 over `warmup_steps`, then constant, cosine to
`min_lr_ratio`, or x`step_gamma` at each fraction in `step_at` of `train.steps`.
Weight decay skips 1-d parameters (norm weights and biases) unless `wd_norm_bias`.
"""
from __future__ import annotations

import math

import torch

from hvdtrain import config as C


def global_batch(cfg: C.Config, ranks: int) -> int:
    return cfg.train.batch_size * ranks * cfg.train.grad_accum_steps


def peak_lr(cfg: C.Config, ranks: int) -> float:
    o = cfg.optim
    return o.lr * global_batch(cfg, ranks) / o.lr_ref_batch if o.lr_ref_batch else o.lr


def param_groups(model: torch.nn.Module, weight_decay: float, wd_norm_bias: bool) -> list[dict]:
    """Two groups: decayed weights, and (unless wd_norm_bias) undecayed norms and biases."""
    if wd_norm_bias or weight_decay == 0:
        return [{"params": [p for p in model.parameters() if p.requires_grad], "weight_decay": weight_decay}]
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (no_decay if p.ndim <= 1 else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def build(cfg: C.Config, model: torch.nn.Module, ranks: int) -> torch.optim.Optimizer:
    o, lr = cfg.optim, peak_lr(cfg, ranks)
    groups = param_groups(model, o.weight_decay, o.wd_norm_bias)
    for g in groups:  # the scheduler's key, present from the start so that a checkpoint's
        g["initial_lr"] = lr  # param groups and a fresh optimizer's have the same keys (broadcast)
    # fused on CUDA: one kernel per step, and GradScaler hands it found_inf on the device
    # (no .item() sync per step, as it needs with the per-tensor implementations)
    fused = {"fused": True} if next(model.parameters()).is_cuda else {}
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, **fused)
    return torch.optim.SGD(groups, lr=lr, momentum=o.momentum, nesterov=o.nesterov and o.momentum > 0, **fused)


def lr_factor(cfg: C.Config, step: int) -> float:
    """Multiplier of the peak lr for optimizer step `step` (0-based: the step about to run)."""
    o, total = cfg.optim, cfg.train.steps
    if step < o.warmup_steps:
        return (step + 1) / o.warmup_steps
    if o.schedule == "cosine":
        span = max(1, total - o.warmup_steps)
        t = min(1.0, (step - o.warmup_steps) / span)
        return o.min_lr_ratio + (1 - o.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    if o.schedule == "step":
        return o.step_gamma ** sum(step >= int(f * total) for f in o.step_at)
    return 1.0


def scheduler(cfg: C.Config, opt: torch.optim.Optimizer, start_step: int = 0) -> torch.optim.lr_scheduler.LambdaLR:
    """LambdaLR over optimizer steps. `start_step`: a resumed run's step (the schedule is
    a pure function of the step, so it needs no state of its own)."""
    return torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(cfg, s), last_epoch=start_step - 1)
