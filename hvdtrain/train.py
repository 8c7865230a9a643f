"""The training step and loop, and `python -m hvdtrain.train` (the run itself:
evaluation, checkpoints, resume and logs, lives in `hvdtrain.session`).

    horovodrun -np 2 python -m hvdtrain.train --preset tinyimagenet \
        --data.train=shards/tiny/train --data.val=shards/tiny/val [--resume auto]

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` per rank; the loss
is divided by grad_accum_steps (Horovod's DistributedOptimizer sums, with
backward_passes_per_step = grad_accum_steps, and averages over ranks). `train_step`
returns device tensors and never calls `.item()`: the loop syncs with the device only
at log intervals.
"""
from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from data.wds import ShardSet
from kernels import mixup
from hvdtrain import config as C
from hvdtrain import checkpoint, dist, model as M, optim, provenance
from hvdtrain.loader import Batch, DaliLoader
from hvdtrain.pipeline import PipeSpec


@dataclass
class TrainState:
    cfg: C.Config
    model: torch.nn.Module
    opt: torch.optim.Optimizer
    device: torch.device
    num_classes: int | None = None
    gen: torch.Generator | None = None   # host RNG for per-batch mixup/cutmix parameters
    step: int = 0
    sched: torch.optim.lr_scheduler.LRScheduler | None = None
    scaler: torch.amp.GradScaler | None = None   # fp16 AMP only
    amp: torch.dtype | None = None                # autocast dtype; None = fp32


@dataclass
class LoopResult:
    step_losses: list[float] = field(default_factory=list)   # this rank's loss per optimizer step
    wall_s: float = 0.0            # the whole loop, first step included
    steady_s: float = 0.0          # from the end of the first step: pipeline warm-up excluded
    data_wait_s: float = 0.0       # time blocked waiting for the loader
    samples: int = 0               # images (not views) consumed by this rank
    steady_samples: int = 0
    interval_img_s: float = 0.0    # all ranks, over the last log interval (from the log allreduce)


class TrainingError(RuntimeError):
    """The run must stop: non-finite loss and similar. The message says where."""


def configure_threads(cfg: C.Config) -> tuple[int, int]:
    """(torch threads, DALI threads) for this rank: the cores are shared among local ranks."""
    cores = dist.cores_per_rank()
    torch_threads = cfg.train.torch_threads or cores
    torch.set_num_threads(torch_threads)
    return torch_threads, max(1, min(cfg.data.threads, cores))


def open_loader(cfg: C.Config, shards: ShardSet, dali_threads: int, train: bool = True,
                views: int | None = None, checkpoint: bytes | None = None, epoch: int = 0) -> DaliLoader:
    """The DALI loader for this rank: shard_id = global rank, device_id = local rank.
    train=False: the val loader (whole set once per pass, partial last batch kept)."""
    gpu = torch.cuda.is_available()
    decode = cfg.data.decode if cfg.data.decode != "auto" else ("mixed" if gpu else "cpu")
    norm = cfg.data.normalize if cfg.data.normalize != "auto" else ("kernel" if decode == "cpu" else "dali")
    if views is None:
        views = 2 if cfg.train.task == "contrastive" else 1
    # contrastive val needs two random views (fixed seed, no shuffle); classify val is deterministic
    augment = cfg.data.augment if train else views == 2
    spec = PipeSpec(batch_size=cfg.train.batch_size if train else (cfg.data.val_batch_size or cfg.train.batch_size),
                    num_threads=dali_threads, shard_id=dist.rank(),
                    num_shards=dist.size(), device_id=dist.local_rank() if gpu else None,
                    seed=cfg.seed * 1000 + dist.rank() + (0 if train else 500), size=cfg.data.size,
                    min_scale=cfg.data.min_scale, views=views, train=augment, decode=decode,
                    shuffle_buffer=cfg.data.shuffle_buffer, prefetch=cfg.data.prefetch, normalize=norm,
                    shuffle=cfg.data.shuffle if train else False)
    return DaliLoader(shards, spec, num_classes=shards.num_classes, device=dist.device(),
                      channels_last=cfg.data.channels_last, drop_last=train, checkpoint=checkpoint, epoch=epoch)


def amp_dtype(cfg: C.Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on CUDA, fp32 (None) on the CPU path."""
    if device.type != "cuda" or cfg.train.amp == "off":
        return None
    return torch.float16 if cfg.train.amp == "fp16" else torch.bfloat16


def make_state(cfg: C.Config, num_classes: int | None, ckpt: dict | None = None) -> TrainState:
    """Model, optimizer, schedule and scaler, identical on every rank: rank 0's state
    (fresh, or `ckpt` loaded on rank 0 only) is broadcast to the others, with the step."""
    device = dist.device()
    torch.manual_seed(cfg.seed)
    heads = num_classes if cfg.train.task == "classify" else None
    if cfg.train.task == "classify" and not num_classes:
        raise TrainingError("task=classify needs the number of classes: the shards have no _info.json")
    m = cfg.model
    model = M.build(m.name, m.width, m.embed_dim, heads, m.norm, m.small_stem).to(device)
    opt = optim.build(cfg, model, dist.size())
    amp = amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda") if amp == torch.float16 else None
    # DistributedOptimizer builds a new optimizer from the param groups (state is not carried
    # over): load a checkpoint's optimizer state into the wrapped one
    opt = dist.wrap_optimizer(opt, model, backward_passes_per_step=cfg.train.grad_accum_steps,
                              fp16_compression=cfg.train.fp16_allreduce)
    step = 0
    if ckpt is not None:  # rank 0 only
        model.load_state_dict(ckpt["model"])
        opt.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        step = ckpt["step"]
    # channels_last applies to the inputs only: Horovod 0.28 allreduces contiguous tensors
    # only, and autograd gives each gradient its parameter's layout, so the weights stay in
    # the default format; cuDNN still picks its NHWC kernels when the input is channels_last
    dist.broadcast_state(model, opt)
    step = dist.broadcast_object(step, name="start_step")
    if scaler is not None:
        scaler.load_state_dict(dist.broadcast_object(scaler.state_dict(), name="scaler"))
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank())
    sched = optim.scheduler(cfg, opt, step)
    return TrainState(cfg, model, opt, device, num_classes, gen, step, sched, scaler, amp)


def autocast(state: TrainState):
    if state.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=state.amp)


def compute_loss(state: TrainState, batch: Batch) -> torch.Tensor:
    cfg = state.cfg
    views = [v.to(state.device, non_blocking=True) for v in batch.views]
    if cfg.data.channels_last:  # a no-op for the kernel-normalize path, which writes channels_last
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    if cfg.train.task == "contrastive":
        z1, z2 = state.model(views[0]), state.model(views[1])
        gather = dist.allgather_grad if cfg.model.gather_negatives else None
        return M.info_nce(z1.float(), z2.float(), cfg.model.temperature, gather, dist.rank())
    labels = batch.labels.to(state.device, non_blocking=True)
    a = cfg.aug
    if a.mixup > 0 or a.cutmix > 0:
        # images + soft targets: one image kernel and one target kernel on CUDA, torch elsewhere
        x = views[0]
        p = mixup.sample_params(x.shape[2], x.shape[3], a.mixup, a.cutmix, a.switch_prob, state.gen)
        x, targets = mixup.mix(x, labels, state.num_classes, p, a.label_smoothing)
        return mixup.soft_cross_entropy(state.model(x).float(), targets)
    return F.cross_entropy(state.model(views[0]).float(), labels, label_smoothing=a.label_smoothing)


def train_step(state: TrainState, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
    """One optimizer step over `grad_accum_steps` micro-batches. Returns device tensors.

    Plain: backward x n -> step (Horovod allreduces during the last backward). With
    clipping or fp16 AMP, Horovod's order: synchronize() -> unscale_ -> clip ->
    step under skip_synchronize() -> scaler.update()."""
    n, opt, scaler = len(micro_batches), state.opt, state.scaler
    total = torch.zeros((), device=state.device)
    for b in micro_batches:
        with autocast(state):
            loss = compute_loss(state, b) / n  # DistributedOptimizer sums the n backward passes
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
    out = {"loss": total}
    clip = state.cfg.train.clip_grad_norm
    if clip > 0 or scaler is not None:
        opt.synchronize()  # gradients averaged over ranks now, so every rank clips the same norm
        if scaler is not None:
            scaler.unscale_(opt)
        if clip > 0:
            out["grad_norm"] = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
        with opt.skip_synchronize():
            scaler.step(opt) if scaler is not None else opt.step()
        if scaler is not None:
            scaler.update()
    else:
        opt.step()
    opt.zero_grad()  # horovod 0.28 takes no set_to_none
    out["lr"] = opt.param_groups[0]["lr"]  # the lr this step used (a float: no device sync)
    if state.sched is not None:
        state.sched.step()
    state.step += 1
    return out


def diverged(state: TrainState, loader, what: str) -> str | None:
    """The error for non-finite weights, or None. Losses are checked only every log_every
    steps; a checkpoint or an elastic commit due in between checks the weights, so a
    diverged model is never saved or rolled back to. A host sync: only at those points."""
    bad = checkpoint.non_finite(state.model.state_dict())
    if not bad:
        return None
    return (f"non-finite weights after step {state.step} ({len(bad)} tensor(s), first {bad[0]}): {what}; rank "
            f"{dist.rank()}'s last data read: {loader.last_source}. Lower optim.lr or set train.clip_grad_norm")


def run_loop(state: TrainState, loader: DaliLoader, steps: int, on_log=None, on_step=None) -> LoopResult:
    """`steps` optimizer steps. Losses are collected as device tensors and synced only
    every `log_every` steps, as the mean over ranks (one allreduce, so every rank sees
    the same values and stops together), where a non-finite loss stops the run naming
    the step and the last shard member read. `on_log(step, values, res, elapsed, out)`
    runs at log points, `on_step(state)` after every step (checkpoints, evaluation)."""
    cfg, res = state.cfg, LoopResult()
    accum, log_every = cfg.train.grad_accum_steps, cfg.train.log_every
    batches, pending = loader.forever(), []
    t0 = time.perf_counter()
    t_steady, t_log, n_log = None, t0, 0
    for i in range(steps):
        t_wait = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        res.data_wait_s += time.perf_counter() - t_wait
        out = train_step(state, micro)
        pending.append(out["loss"])
        n_img = accum * cfg.train.batch_size
        res.samples += n_img
        if t_steady is None:
            t_steady = time.perf_counter()
        else:
            res.steady_samples += n_img
        if len(pending) == log_every or i == steps - 1:
            now = time.perf_counter()
            rate = (res.samples - n_log) / max(now - t_log, 1e-9)
            local = torch.cat([torch.stack(pending).double().cpu(),  # note: a device->host sync point
                               torch.tensor([rate], dtype=torch.float64)])
            reduced = dist.allreduce_mean(local, name="loss_log").tolist()  # one collective per log line
            values, res.interval_img_s = reduced[:-1], reduced[-1] * dist.size()
            pending, t_log, n_log = [], now, res.samples
            bad = [v for v in values if not math.isfinite(v)]
            if bad:
                raise TrainingError(f"non-finite loss {bad[0]} (mean over ranks) by step {state.step} "
                                    f"(steps {state.step - len(values) + 1}..{state.step}); rank {dist.rank()}'s "
                                    f"last data read: {loader.last_source}. Lower optim.lr, set "
                                    f"train.clip_grad_norm, or check that sample")
            res.step_losses.extend(values)
            if on_log is not None:
                on_log(state.step, values, res, time.perf_counter() - t0, out)
        if on_step is not None:
            on_step(state)
    res.wall_s = time.perf_counter() - t0
    res.steady_s = time.perf_counter() - (t_steady or t0)
    return res


def aggregate_throughput(res: LoopResult) -> dict:
    """Images/s over all ranks, measured with one allreduce (not rank 0 x size):
    total images / slowest rank's time."""
    t = torch.tensor([[res.samples, res.steady_samples, res.wall_s, res.steady_s, res.data_wait_s]],
                     dtype=torch.float64)
    every = dist.allgather(t, name="throughput")  # [size, 5]: one collective
    total, slowest = every.sum(dim=0), every.max(dim=0).values
    return {"images": int(total[0]), "images_per_s": float(total[0] / max(slowest[2], 1e-9)),
            "steady_images_per_s": float(total[1] / max(slowest[3], 1e-9)) if total[1] > 0 else None,
            "data_wait_share": float(total[4] / max(total[2], 1e-9))}


def make_run_dir(cfg: C.Config) -> str:
    """Rank 0 picks (and creates) the run folder; every rank gets the same path."""
    path = None
    if dist.is_primary():
        path = cfg.run.dir or os.path.join("runs", provenance.run_id(cfg.run.name))
        os.makedirs(path, exist_ok=True)
    return dist.broadcast_object(path, name="run_dir")


def main(argv: list[str] | None = None) -> int:
    """`python -m hvdtrain.train`: parse, start Horovod, run `session.fit`, exit 0 / 1 / 2."""
    from hvdtrain import session

    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, _ = C.parse_args(argv, default_preset="sanity")
    except C.ConfigError as e:
        print(f"hvdtrain.train: {e}", file=sys.stderr)
        return 2
    dist.init()
    return session.main(cfg)


if __name__ == "__main__":
    sys.exit(main())
