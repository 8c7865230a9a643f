"""The training step and loop, and `python -m hvdtrain.train`.

    horovodrun -np 2 python -m hvdtrain.train --preset sanity --data.train=shards/train \
        --train.task=classify --train.steps=300

One optimizer step = `grad_accum_steps` micro-batches of `batch_size` per rank; the loss
is divided by grad_accum_steps (Horovod's DistributedOptimizer sums, with
backward_passes_per_step = grad_accum_steps, and averages over ranks). `train_step`
returns device tensors and never calls `.item()`: the loop syncs with the device only
at log intervals.
"""
from __future__ import annotations

import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from data.wds import ShardError, ShardSet, open_shards
import kernels
from kernels import mixup
from hvdtrain import config as C
from hvdtrain import dist, model as M, provenance
from hvdtrain.loader import Batch, DaliLoader, DataError
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


@dataclass
class LoopResult:
    step_losses: list[float] = field(default_factory=list)   # this rank's loss per optimizer step
    wall_s: float = 0.0            # the whole loop, first step included
    steady_s: float = 0.0          # from the end of the first step: pipeline warm-up excluded
    data_wait_s: float = 0.0       # time blocked waiting for the loader
    samples: int = 0               # images (not views) consumed by this rank
    steady_samples: int = 0


class TrainingError(RuntimeError):
    """The run must stop: non-finite loss and similar. The message says where."""


def configure_threads(cfg: C.Config) -> tuple[int, int]:
    """(torch threads, DALI threads) for this rank: the cores are shared among local ranks."""
    cores = dist.cores_per_rank()
    torch_threads = cfg.train.torch_threads or cores
    torch.set_num_threads(torch_threads)
    return torch_threads, max(1, min(cfg.data.threads, cores))


def open_loader(cfg: C.Config, shards: ShardSet, dali_threads: int, train: bool = True,
                views: int | None = None) -> DaliLoader:
    """The DALI loader for this rank: shard_id = global rank, device_id = local rank."""
    gpu = torch.cuda.is_available()
    decode = cfg.data.decode if cfg.data.decode != "auto" else ("mixed" if gpu else "cpu")
    norm = cfg.data.normalize if cfg.data.normalize != "auto" else ("kernel" if decode == "cpu" else "dali")
    if views is None:
        views = 2 if cfg.train.task == "contrastive" else 1
    spec = PipeSpec(batch_size=cfg.train.batch_size, num_threads=dali_threads, shard_id=dist.rank(),
                    num_shards=dist.size(), device_id=dist.local_rank() if gpu else None,
                    seed=cfg.seed * 1000 + dist.rank(), size=cfg.data.size, min_scale=cfg.data.min_scale,
                    views=views, train=train, decode=decode, shuffle_buffer=cfg.data.shuffle_buffer,
                    prefetch=cfg.data.prefetch, normalize=norm)
    return DaliLoader(shards, spec, num_classes=shards.num_classes, device=dist.device(),
                      channels_last=cfg.data.channels_last)


def make_state(cfg: C.Config, num_classes: int | None) -> TrainState:
    """Model and optimizer, identical on every rank (rank 0's state is broadcast)."""
    device = dist.device()
    torch.manual_seed(cfg.seed)
    heads = num_classes if cfg.train.task == "classify" else None
    if cfg.train.task == "classify" and not num_classes:
        raise TrainingError("task=classify needs the number of classes: the shards have no _info.json")
    model = M.build(cfg.model.name, cfg.model.width, cfg.model.embed_dim, heads).to(device)
    o = cfg.optim
    if o.name == "adamw":
        opt = torch.optim.AdamW(model.parameters(), lr=o.lr, weight_decay=o.weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=o.lr, momentum=o.momentum, weight_decay=o.weight_decay)
    opt = dist.wrap_optimizer(opt, model, backward_passes_per_step=cfg.train.grad_accum_steps)
    dist.broadcast_state(model, opt)
    if cfg.data.channels_last:
        model = model.to(memory_format=torch.channels_last)
    gen = torch.Generator().manual_seed(cfg.seed * 1000 + dist.rank())
    return TrainState(cfg, model, opt, device, num_classes, gen)


def compute_loss(state: TrainState, batch: Batch) -> torch.Tensor:
    views = [v.to(state.device, non_blocking=True) for v in batch.views]
    if state.cfg.train.task == "contrastive":
        z1, z2 = state.model(views[0]), state.model(views[1])
        return M.info_nce(z1, z2, state.cfg.model.temperature)
    labels = batch.labels.to(state.device, non_blocking=True)
    a = state.cfg.aug
    if a.mixup > 0 or a.cutmix > 0:
        # images + soft targets: one image kernel and one target kernel on CUDA, torch elsewhere
        x = views[0]
        p = mixup.sample_params(x.shape[2], x.shape[3], a.mixup, a.cutmix, a.switch_prob, state.gen)
        x, targets = mixup.mix(x, labels, state.num_classes, p, a.label_smoothing)
        return mixup.soft_cross_entropy(state.model(x), targets)
    return F.cross_entropy(state.model(views[0]), labels, label_smoothing=a.label_smoothing)


def train_step(state: TrainState, micro_batches: list[Batch]) -> dict[str, torch.Tensor]:
    """One optimizer step over `grad_accum_steps` micro-batches. Returns device tensors."""
    n = len(micro_batches)
    total = torch.zeros((), device=state.device)
    for b in micro_batches:
        loss = compute_loss(state, b) / n  # DistributedOptimizer sums the n backward passes
        loss.backward()
        total += loss.detach()
    state.opt.step()
    state.opt.zero_grad()  # horovod 0.28 takes no set_to_none
    state.step += 1
    return {"loss": total}


def run_loop(state: TrainState, loader: DaliLoader, steps: int, on_log=None) -> LoopResult:
    """`steps` optimizer steps. Losses are collected as device tensors and synced only
    every `log_every` steps, where a non-finite loss stops the run naming the step and
    the last shard member read."""
    cfg, res = state.cfg, LoopResult()
    accum, log_every = cfg.train.grad_accum_steps, cfg.train.log_every
    batches, pending = loader.forever(), []
    t0 = time.perf_counter()
    t_steady = None
    for i in range(steps):
        t_wait = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        res.data_wait_s += time.perf_counter() - t_wait
        pending.append(train_step(state, micro)["loss"])
        n_img = accum * cfg.train.batch_size
        res.samples += n_img
        if t_steady is None:
            t_steady = time.perf_counter()
        else:
            res.steady_samples += n_img
        if len(pending) == log_every or i == steps - 1:
            values = torch.stack(pending).tolist()  # note: a device->host sync point
            pending = []
            bad = [v for v in values if not math.isfinite(v)]
            if bad:
                raise TrainingError(f"non-finite loss {bad[0]} by step {state.step} (rank {dist.rank()}); "
                                    f"last data read: {loader.last_source}")
            res.step_losses.extend(values)
            if on_log is not None:
                on_log(state.step, values, res, time.perf_counter() - t0)
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


def describe_data(cfg: C.Config) -> tuple[ShardSet, dict]:
    try:
        train = open_shards(cfg.data.train)
    except ShardError as e:
        raise SystemExit(f"hvdtrain: data error: {e}")
    return train, {"train": train.describe()}


def main(argv: list[str] | None = None) -> int:
    """Train and log (the next issue adds evaluation, checkpoints and resume)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, _ = C.parse_args(argv, default_preset="sanity")
    except C.ConfigError as e:
        print(f"hvdtrain.train: {e}", file=sys.stderr)
        return 2
    dist.init()
    torch_threads, dali_threads = configure_threads(cfg)
    shards, data = describe_data(cfg)
    run_dir = make_run_dir(cfg)
    code = provenance.code_state()
    chash = C.config_hash(cfg)
    if dist.is_primary():
        print(provenance.banner(code, chash, data, dist.size(), str(dist.device())), flush=True)
        with open(os.path.join(run_dir, "config.json"), "w") as f:
            json.dump({"config": C.to_dict(cfg), "config_hash": chash, **code, "data": data,
                       "slurm": provenance.slurm_job(),
                       "versions": provenance.versions()}, f, indent=1)
    state = make_state(cfg, shards.num_classes)
    loader = open_loader(cfg, shards, dali_threads)
    if dist.is_primary():
        a = cfg.aug
        print(f"input   DALI decode {loader.spec.decode}, normalize {loader.spec.normalize}, mixup {a.mixup}, "
              f"cutmix {a.cutmix}; kernels: {kernels.describe(state.device)}", flush=True)
    metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a") if dist.is_primary() else None

    def on_log(step, values, res, elapsed):
        if metrics is None:
            return
        rec = {"step": step, "loss": sum(values) / len(values), "elapsed_s": round(elapsed, 3),
               "throughput_img_s_rank0": res.samples / max(elapsed, 1e-9), "epoch": loader.epoch,
               "data_wait_share": res.data_wait_s / max(elapsed, 1e-9)}
        metrics.write(json.dumps(rec) + "\n")
        metrics.flush()
        print(f"step {step:5d}  loss {rec['loss']:.4f}  {rec['throughput_img_s_rank0']:.0f} img/s (rank 0)"
              f"  epoch {loader.epoch}", flush=True)

    try:
        res = run_loop(state, loader, cfg.train.steps, on_log)
    except (DataError, TrainingError) as e:
        print(f"hvdtrain.train: rank {dist.rank()}: {e}", file=sys.stderr, flush=True)
        return 1
    agg = aggregate_throughput(res)
    if dist.is_primary():
        print(f"done: {cfg.train.steps} steps, {agg['images']} images, {agg['images_per_s']:.1f} img/s "
              f"(all ranks), run folder {run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
