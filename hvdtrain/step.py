"""The step and the loop: below the run that drives them (`hvdtrain.session`).

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` per rank; the loss
is divided by grad_accum_steps (Horovod's DistributedOptimizer sums, with
backward_passes_per_step = grad_accum_steps, and averages over ranks). `train_step`
returns device tensors and never calls `.item()`: the loop syncs with the device only
at log intervals, where it also reads the step-time breakdown (`hvdtrain.timing`).
"""
from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field

import torch

from hvdtrain import checkpoint, dist, model as M, optim
from hvdtrain import config as C
from hvdtrain import task as TK
from hvdtrain import timing
from hvdtrain.batch import Batch


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

    @property
    def task(self):
        return TK.get(self.cfg.train.task)


@dataclass
class LoopResult:
    step_losses: list[float] = field(default_factory=list)   # loss per optimizer step (mean over ranks)
    wall_s: float = 0.0            # the whole loop, first step included
    steady_s: float = 0.0          # from the end of the first step: pipeline warm-up excluded
    data_wait_s: float = 0.0       # time blocked waiting for the loader
    samples: int = 0               # images (not views) consumed by this rank
    steady_samples: int = 0
    interval_img_s: float = 0.0    # all ranks, over the last log interval (from the log allreduce)
    phase_s: dict = field(default_factory=dict)     # seconds per timing phase, after the first interval
    interval_phase_s: dict = field(default_factory=dict)  # the same, over the last log interval
    stopped: bool = False          # `stop` ended the loop before `steps` (preemption)
    # every rank's seconds, after the first interval, from the log allreduce (the same on
    # every rank): busy = the step but the allreduce wait; wait = the allreduce wait
    rank_busy_s: list = field(default_factory=list)
    rank_wait_s: list = field(default_factory=list)


class TrainingError(RuntimeError):
    """The run must stop: non-finite loss and similar. The message says where."""


def configure_threads(cfg: C.Config) -> tuple[int, int]:
    """(torch threads, DALI threads) for this rank: the cores are shared among local ranks."""
    cores = dist.cores_per_rank()
    torch_threads = cfg.train.torch_threads or cores
    torch.set_num_threads(torch_threads)
    return torch_threads, max(1, min(cfg.data.threads, cores))


def amp_dtype(cfg: C.Config, device: torch.device) -> torch.dtype | None:
    """Autocast dtype: bf16/fp16 on CUDA, fp32 (None) on the CPU path."""
    if device.type != "cuda" or cfg.train.amp == "off":
        return None
    return torch.float16 if cfg.train.amp == "fp16" else torch.bfloat16


def make_state(cfg: C.Config, num_classes: int | None, ckpt: dict | None = None, broadcast: bool = True) -> TrainState:
    """Model, optimizer, schedule and scaler, identical on every rank: rank 0's state
    (fresh, or `ckpt` loaded on rank 0 only) is broadcast to the others, with the step.
    `broadcast=False`: an elastic joiner, whose state comes with the elastic sync."""
    device = dist.device()
    torch.manual_seed(cfg.seed)
    task = TK.get(cfg.train.task)
    if task.needs_classes and not num_classes:
        raise TrainingError(f"task={task.name} needs the number of classes: the shards have no _info.json and "
                            f"no labels to count them from; pass --data.num_classes=N")
    model = M.build(cfg.model, task.head(num_classes)).to(device)
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
    if broadcast:
        dist.broadcast_state(model, opt)
        step = dist.broadcast_object(step, name="start_step")
        if scaler is not None:
            scaler.load_state_dict(dist.broadcast_object(scaler.state_dict(), name="scaler"))
    gen = torch.Generator().manual_seed(C.derive_seed(cfg.seed, "host", dist.rank()))
    sched = optim.scheduler(cfg, opt, step)
    return TrainState(cfg, model, opt, device, num_classes, gen, step, sched, scaler, amp)


def autocast(state: TrainState):
    if state.amp is None:
        return contextlib.nullcontext()
    return torch.autocast(state.device.type, dtype=state.amp)


def to_device(state: TrainState, batch: Batch) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Views (channels_last if asked) and labels on the training device: a no-op for what
    the loader already put there."""
    views = [v.to(state.device, non_blocking=True) for v in batch.views]
    if state.cfg.data.channels_last:  # a no-op for the kernel-normalize path, which writes channels_last
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return views, batch.labels.to(state.device, non_blocking=True)


def compute_loss(state: TrainState, batch: Batch) -> torch.Tensor:
    views, labels = to_device(state, batch)
    return state.task.loss(state.cfg, state.model, views, labels, state.num_classes, state.gen,
                           dist.allgather_grad, dist.rank())


def train_step(state: TrainState, micro_batches: list[Batch], clock=None) -> dict[str, torch.Tensor]:
    """One optimizer step over `grad_accum_steps` micro-batches. Returns device tensors.

    Horovod's order: backward x n (allreduces start during the last backward) ->
    synchronize() (wait for them: the allreduce phase) -> unscale_ (fp16) -> clip -> step
    under skip_synchronize() -> scaler.update(). `clock` (timing.StepClock) marks phases."""
    clock = clock or timing.NoClock()
    n, opt, scaler, task = len(micro_batches), state.opt, state.scaler, state.task
    total = torch.zeros((), device=state.device)
    for b in micro_batches:
        views, labels = to_device(state, b)
        clock.mark("h2d")
        with autocast(state):
            loss = task.loss(state.cfg, state.model, views, labels, state.num_classes, state.gen,
                             dist.allgather_grad, dist.rank()) / n  # DistributedOptimizer sums the n passes
        (scaler.scale(loss) if scaler is not None else loss).backward()
        total += loss.detach()
        clock.mark("fwd_bwd")
    out = {"loss": total}
    opt.synchronize()  # gradients averaged over ranks now, so every rank clips the same norm
    clock.mark("allreduce")
    if scaler is not None:
        scaler.unscale_(opt)
    clip = state.cfg.train.clip_grad_norm
    if clip > 0:
        out["grad_norm"] = torch.nn.utils.clip_grad_norm_(state.model.parameters(), clip)
    with opt.skip_synchronize():
        scaler.step(opt) if scaler is not None else opt.step()
    if scaler is not None:
        scaler.update()
    opt.zero_grad()  # horovod 0.28 takes no set_to_none
    out["lr"] = opt.param_groups[0]["lr"]  # the lr this step used (a float: no device sync)
    if state.sched is not None:
        state.sched.step()
    state.step += 1
    clock.mark("optimizer")
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


def _log_point(state, loader, pending, res, rate, clock, first_interval) -> list[float]:
    """The one sync and collective of a log interval: losses and img/s as the mean over
    ranks; a non-finite loss stops every rank together."""
    res.interval_phase_s = clock.collect()
    # this rank's busy and allreduce-wait seconds in its own slots of a per-rank vector: the
    # mean over ranks, times size, gives every rank's (a straggler named, no extra collective)
    n, size, me = len(pending), dist.size(), dist.rank()
    mine = torch.zeros(2 * size, dtype=torch.float64)
    wait_s = res.interval_phase_s["allreduce"]
    mine[2 * me], mine[2 * me + 1] = sum(res.interval_phase_s.values()) - wait_s, wait_s
    local = torch.cat([torch.stack(pending).double().cpu(),  # note: a device->host sync point
                       torch.tensor([rate], dtype=torch.float64), mine])
    reduced = dist.allreduce_mean(local, name="loss_log").tolist()  # one collective per log line
    values, res.interval_img_s = reduced[:n], reduced[n] * size
    if not first_interval:  # the first interval holds the pipeline's warm-up
        timing.add(res.phase_s, res.interval_phase_s)
        per_rank = [v * size for v in reduced[n + 1:]]
        res.rank_busy_s = [a + b for a, b in zip(res.rank_busy_s or [0.0] * size, per_rank[0::2])]
        res.rank_wait_s = [a + b for a, b in zip(res.rank_wait_s or [0.0] * size, per_rank[1::2])]
    bad = [v for v in values if not math.isfinite(v)]
    if bad:
        raise TrainingError(f"non-finite loss {bad[0]} (mean over ranks) by step {state.step} "
                            f"(steps {state.step - len(values) + 1}..{state.step}); rank {dist.rank()}'s "
                            f"last data read: {loader.last_source}. Lower optim.lr, set "
                            f"train.clip_grad_norm, or check that sample")
    return values


def run_loop(state: TrainState, loader, steps: int, on_log=None, on_step=None, stop=None) -> LoopResult:
    """`steps` optimizer steps. Losses are collected as device tensors and synced only
    every `log_every` steps (`_log_point`), with the step-time breakdown. `on_log(step,
    values, res, elapsed, out)` runs at log points, `on_step(state)` after every step
    (checkpoints, evaluation: their time is left out of the breakdown). `stop(state)`,
    asked after every step but the last, may end the loop after that step (preemption:
    `hvdtrain.preempt`); it must give every rank the same answer (a collective). The
    losses up to that step are logged and `on_step` runs, then `res.stopped` is set."""
    cfg, res = state.cfg, LoopResult()
    accum, log_every = cfg.train.grad_accum_steps, cfg.train.log_every
    batches, pending = loader.forever(), []
    clock = timing.StepClock(state.device)
    t0 = time.perf_counter()
    t_steady, t_log, n_log, first = None, t0, 0, True
    for i in range(steps):
        clock.mark("other")
        t_wait = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        res.data_wait_s += time.perf_counter() - t_wait
        clock.mark("data_wait")
        out = train_step(state, micro, clock)
        pending.append(out["loss"])
        n_img = accum * cfg.train.batch_size
        res.samples += n_img
        if t_steady is None:
            t_steady = time.perf_counter()
        else:
            res.steady_samples += n_img
        stopping = stop is not None and i < steps - 1 and stop(state)
        if len(pending) == log_every or i == steps - 1 or stopping:
            now = time.perf_counter()
            values = _log_point(state, loader, pending, res, (res.samples - n_log) / max(now - t_log, 1e-9),
                                clock, first)
            pending, t_log, n_log, first = [], now, res.samples, False
            res.step_losses.extend(values)
            if on_log is not None:
                on_log(state.step, values, res, time.perf_counter() - t0, out)
        if on_step is not None:
            clock.mark("other")
            on_step(state)
            clock.skip()
        if stopping:
            res.stopped = True
            break
    if not res.phase_s:  # a single interval: report it, warm-up and all
        res.phase_s = dict(res.interval_phase_s)
    res.wall_s = time.perf_counter() - t0
    res.steady_s = time.perf_counter() - (t_steady or t0)
    return res


def aggregate_throughput(res: LoopResult) -> dict:
    """Images/s over all ranks, measured with one allgather (not rank 0 x size): total
    images / slowest rank's time; and the step-time breakdown summed over ranks."""
    phases = [res.phase_s.get(p, 0.0) for p in timing.PHASES]
    t = torch.tensor([[res.samples, res.steady_samples, res.wall_s, res.steady_s, res.data_wait_s] + phases],
                     dtype=torch.float64)
    every = dist.allgather(t, name="throughput")  # [size, 5 + phases]: one collective
    total, slowest = every.sum(dim=0), every.max(dim=0).values
    return {"images": int(total[0]), "images_per_s": float(total[0] / max(slowest[2], 1e-9)),
            "steady_images_per_s": float(total[1] / max(slowest[3], 1e-9)) if total[1] > 0 else None,
            "data_wait_share": float(total[4] / max(total[2], 1e-9)),
            "phase_s": dict(zip(timing.PHASES, total[5:].tolist()))}
