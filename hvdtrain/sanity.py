"""The GO/NO-GO run: does this machine train, fast enough, on the data we think?

    horovodrun -np 2 python -m hvdtrain.sanity                      # embedded synthetic data
    horovodrun -np 2 python -m hvdtrain.sanity --data.train=DIR --slo slo.json
    horovodrun -np 2 python -m hvdtrain.sanity --preset ci          # seconds, for tests

Defaults are the seed's Day-2 configuration: batch 16 per rank, grad_accum_steps 8,
24 DALI threads (capped to the cores per rank), lr 5e-4, embed_dim 256, seed 1337, 200
optimizer steps of a two-view InfoNCE encoder (loss starts near ln 16 = 2.7726).
It measures the loader, trains, and judges the SLOs (bench/slo.py): loader >= 300
img/s, loss reduction >= 0.15, time <= 25 min, GPU utilisation >= 85 % (NOT EVALUATED
with no GPU). Writes runs/<run-id>/sanity.json, sanity.md and loss.png. Exit 0 on GO,
1 on NO-GO, 2 on a usage or data error.
"""
from __future__ import annotations

import math
import os
import resource
import sys
import time

import torch

from bench import slo as S
from data import synth
from data.wds import INFO_NAME, ShardError, open_shards
from hvdtrain import config as C
from hvdtrain import dist, provenance, report
from hvdtrain import train as T
from hvdtrain.gpumon import GpuMonitor
from hvdtrain.loader import DataError

LOADER_PROBE_BATCHES = 24  # per rank, after 4 warm-up batches: a few seconds on 2 CPU cores


def embedded_data(cfg: C.Config) -> str:
    """The embedded synthetic set (10 classes, 64 px), built once by rank 0."""
    root = os.path.join("runs", "data", f"synth-c10-s64-seed{cfg.seed}")
    if dist.is_primary() and not os.path.exists(os.path.join(root, "train", INFO_NAME)):
        print(f"building the embedded synthetic data set under {root} ...", flush=True)
        synth.make(root, classes=10, train=4096, val=1024, size=64, seed=cfg.seed)
    dist.barrier()
    return os.path.join(root, "train")


def probe_loader(loader) -> float:
    """Loader-only images/s summed over ranks (one allgather), warm-up excluded."""
    it = loader.forever()
    for _ in range(4):
        next(it)
    t0 = time.perf_counter()
    for _ in range(LOADER_PROBE_BATCHES):
        next(it)
    dt = time.perf_counter() - t0
    every = dist.allgather(torch.tensor([[LOADER_PROBE_BATCHES * loader.spec.batch_size, dt]],
                                        dtype=torch.float64), name="loader_probe")
    return float(every[:, 0].sum() / every[:, 1].max())


def max_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "VRAM, torch max allocated, this rank"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS, rank 0, no GPU"


def run(cfg: C.Config, slo_file: str | None) -> dict:
    t_start = time.perf_counter()
    torch_threads, dali_threads = T.configure_threads(cfg)
    if not cfg.data.train:
        cfg.data.train = embedded_data(cfg)
    shards = open_shards(cfg.data.train)
    data = {"train": shards.describe()}
    run_dir = T.make_run_dir(cfg)
    code, chash = provenance.code_state(), C.config_hash(cfg)
    if dist.is_primary():
        print(provenance.banner(code, chash, data, dist.size(), str(dist.device())), flush=True)
    state = T.make_state(cfg, shards.num_classes)
    loader = T.open_loader(cfg, shards, dali_threads)
    loader_img_s = probe_loader(loader)
    mon = GpuMonitor(state.device)

    def on_log(step, values, res, elapsed, *_):
        if step == cfg.train.log_every:
            mon.start()  # sample the measured window only: after the first log interval
        if dist.is_primary():
            print(f"step {step:4d}/{cfg.train.steps}  loss {sum(values) / len(values):.4f}  "
                  f"{res.samples / max(elapsed, 1e-9):.0f} img/s (rank 0)  epoch {loader.epoch}", flush=True)

    res = T.run_loop(state, loader, cfg.train.steps, on_log)
    gpu = mon.stop()
    agg = T.aggregate_throughput(res)
    losses = dist.allreduce_mean(torch.tensor(res.step_losses, dtype=torch.float64), name="losses").tolist()
    wall_s = time.perf_counter() - t_start
    k = max(1, min(10, len(losses) // 2))  # first/last windows never overlap
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    slos = S.load(slo_file)
    results = [S.check(slos["loader_img_s"], loader_img_s),
               S.check(slos["loss_reduction"], first - last),
               S.check(slos["sanity_time_min"], wall_s / 60),
               S.check(slos["gpu_util_pct"], gpu["util_mean_pct"], gpu.get("why", ""))]
    mem, mem_kind = max_memory()
    return {"verdict": S.verdict(results), "config": C.to_dict(cfg), "config_hash": chash, **code,
            "run_dir": run_dir, "data": data, "ranks": dist.size(), "device": str(state.device),
            "torch_threads": torch_threads, "dali_threads": dali_threads, "decode": loader.spec.decode,
            "loss_step1": losses[0], "loss_first10": first, "loss_last10": last, "loss_reduction": first - last,
            "ln_batch": math.log(cfg.train.batch_size), "loss_per_step": losses,
            "wall_time_s": wall_s, "train_time_s": res.wall_s, "images_per_s": agg["images_per_s"],
            "steady_images_per_s": agg["steady_images_per_s"], "data_wait_share": agg["data_wait_share"],
            "loader_img_s": loader_img_s, "max_memory_gib": mem, "memory_kind": mem_kind, "gpu": gpu,
            "slos": results, "slo_file": slo_file, "versions": provenance.versions(),
            "slurm": provenance.slurm_job(),
            "epochs_seen": loader.epoch}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, extra = C.parse_args(argv, default_preset="sanity", extra_flags=("slo",))
        S.load(extra.get("slo"))  # a bad SLO file fails before any work
    except (C.ConfigError, OSError, ValueError) as e:
        print(f"hvdtrain.sanity: {e}", file=sys.stderr)
        return 2
    dist.init()
    try:
        r = run(cfg, extra.get("slo"))
    except (ShardError, DataError, T.TrainingError) as e:
        print(f"hvdtrain.sanity: rank {dist.rank()}: {e}", file=sys.stderr, flush=True)
        return 2
    if dist.is_primary():
        d = r["run_dir"]
        report.loss_plot(os.path.join(d, "loss.png"), r["loss_per_step"],
                         f"sanity {r['verdict']}  {r['git_sha'][:10]}  cfg {r['config_hash']}")
        if r["gpu"].get("timeline"):
            report.util_plot(os.path.join(d, "gpu_util.png"), r["gpu"]["timeline"])
        report.write_json(os.path.join(d, "sanity.json"), r)
        with open(os.path.join(d, "sanity.md"), "w") as f:
            f.write(report.sanity_markdown(r))
        print("\n" + report.sanity_table(r))
        print(f"report: {os.path.join(d, 'sanity.md')}  json: {os.path.join(d, 'sanity.json')}", flush=True)
    # horovodrun kills the other ranks when one exits non-zero: leave together, after rank 0 wrote
    dist.barrier()
    return 0 if r["verdict"] == "GO" else 1


if __name__ == "__main__":
    sys.exit(main())
