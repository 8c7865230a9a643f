"""The GO/NO-GO run: does this machine train, fast enough, on the data it was given?

    horovodrun -np 2 python -m hvdtrain.sanity                      # embedded synthetic data
    horovodrun -np 2 python -m hvdtrain.sanity --data.train=DIR --slo slo.json
    horovodrun -np 2 python -m hvdtrain.sanity --preset ci          # seconds, for tests
    horovodrun -np 2 python -m hvdtrain.sanity --data.loader=synthetic   # compute alone, no reader

It is a training run with the sanity preset (`session.Run`, no checkpoints), then a
judgement: the SLOs of hvdtrain/slo.py (loader >= 300 img/s, loss reduction >= 0.15,
time <= 25 min, GPU utilisation >= 85 %; NOT EVALUATED with no GPU) and where the step
time went (`hvdtrain.timing`): a NO-GO on throughput or utilisation names the dominant
cause with its share and the next thing to try. Defaults are the GO/NO-GO
configuration: batch 16 per rank, grad_accum_steps 8, 24 DALI threads (capped to the
cores per rank), lr 5e-4, embed_dim 256, seed 1337, 200 optimizer steps of a two-view
InfoNCE encoder (loss starts near ln 16 = 2.7726). Rank 0 writes runs/<run-id>/
sanity.json, sanity.md and loss.png beside the run's config.json, metrics.jsonl and
summary.json.

Exit codes: `hvdtrain.exits`; here OK is GO and FAILED is a NO-GO (an SLO failed) as
well as a failed run, a bad sample refuses (REFUSED), and a PREEMPTED sanity cannot be
resumed (it writes no checkpoints): run it again. launch/slurm_run.sh does not requeue it.
"""
from __future__ import annotations

import math
import os
import resource
import sys
import time

import torch

from hvdtrain.data import embedded
from hvdtrain.data.files import write_atomic
from hvdtrain import config as C
from hvdtrain import dist, exitmark, exits, logs, preempt, provenance, report, session
from hvdtrain import slo as S
from hvdtrain import timing
from hvdtrain.loader import DataError

LOADER_PROBE_BATCHES = 24  # per rank, after 4 warm-up batches: a few seconds on 2 CPU cores
EXPLAINED = ("loader_img_s", "gpu_util_pct")  # SLOs whose failure the step-time breakdown explains


def probe_loader(loader) -> float:
    """Loader-only images/s summed over ranks (one allgather), warm-up excluded."""
    it = loader.forever()
    for _ in range(4):
        next(it)
    t0 = time.perf_counter()
    n = 0
    for _ in range(LOADER_PROBE_BATCHES):
        n += next(it).labels.numel()
    dt = time.perf_counter() - t0
    every = dist.allgather(torch.tensor([[n, dt]], dtype=torch.float64), name="loader_probe")
    return float(every[:, 0].sum() / every[:, 1].max())


def max_memory() -> tuple[float, str]:
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**30, "VRAM, torch max allocated, this rank"
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, "host RSS, rank 0, no GPU"


def judge(results: list[dict], breakdown: dict) -> str | None:
    """Why a NO-GO on throughput or utilisation happened, from the step-time breakdown."""
    failed = [r["name"] for r in results if r["name"] in EXPLAINED and r["passed"] is False]
    if not failed:
        return None
    return f"{', '.join(failed)} failed; {timing.describe(breakdown)}"


def run(cfg: C.Config, slo_file: str | None) -> dict:
    t_start = time.perf_counter()
    synthetic = cfg.data.loader == "synthetic"
    if not cfg.data.train and not synthetic:
        cfg.data.train = embedded.ensure(cfg.seed, log=logs.say)
    with session.Run(cfg, checkpoints=False) as r:
        loader_img_s = None if synthetic else probe_loader(r.loader)  # no reader to measure
        result = r.train()
        loader = {"loader": r.loader.describe(), "decode": getattr(getattr(r.loader, "spec", None), "decode", None),
                  "epochs_seen": r.loader.epoch, "synthetic": synthetic}
    # leaving the block released the loaders and their pipelines (session.Run.release_loaders)
    wall_s = time.perf_counter() - t_start
    losses, agg = result.loop.step_losses, result.throughput  # losses: the mean over ranks, per step
    k = max(1, min(10, len(losses) // 2))  # first/last windows never overlap
    first, last = sum(losses[:k]) / k, sum(losses[-k:]) / k
    slos = S.load(slo_file)
    gpu = result.gpu
    results = [S.check(slos["loader_img_s"], loader_img_s, "synthetic data: no reader to measure"),
               S.check(slos["loss_reduction"], first - last),
               S.check(slos["sanity_time_min"], wall_s / 60),
               S.check(slos["gpu_util_pct"], gpu["util_mean_pct"], gpu.get("why", ""))]
    mem, mem_kind = max_memory()
    return {"verdict": S.verdict(results), "config": C.to_dict(cfg), "config_hash": r.prov["config_hash"],
            **{k: v for k, v in r.prov.items() if k.startswith("git_") or k == "code_path"},
            "run_dir": r.dir, "data": r.data, "ranks": dist.size(), "placement": r.placement,
            "nodes": sorted({p["node"] for p in r.placement}), "device": str(r.state.device),
            "torch_threads": r.torch_threads, "dali_threads": r.dali_threads, **loader,
            "loss_step1": losses[0], "loss_first10": first, "loss_last10": last, "loss_reduction": first - last,
            "ln_batch": math.log(cfg.train.batch_size), "loss_per_step": losses,
            "wall_time_s": wall_s, "train_time_s": result.loop.wall_s, "images_per_s": agg["images_per_s"],
            "steady_images_per_s": agg["steady_images_per_s"], "data_wait_share": agg["data_wait_share"],
            "breakdown": result.breakdown, "why": judge(results, result.breakdown),
            "loader_img_s": loader_img_s, "max_memory_gib": mem, "memory_kind": mem_kind, "gpu": gpu,
            "slos": results, "slo_file": slo_file, "versions": provenance.versions(),
            "slurm": provenance.slurm_job()}


def write(r: dict) -> None:
    """Rank 0: sanity.json, sanity.md, loss.png (and gpu_util.png) in the run folder."""
    d = r["run_dir"]
    report.loss_plot(os.path.join(d, "loss.png"), r["loss_per_step"],
                     f"sanity {r['verdict']}  {r['git_sha'][:10]}  cfg {r['config_hash']}")
    if r["gpu"].get("timeline"):
        report.util_plot(os.path.join(d, "gpu_util.png"), r["gpu"]["timeline"])
    report.write_json(os.path.join(d, "sanity.json"), r)
    write_atomic(os.path.join(d, "sanity.md"), report.sanity_markdown(r))
    print("\n" + report.sanity_table(r))
    print(f"report: {os.path.join(d, 'sanity.md')}  json: {os.path.join(d, 'sanity.json')}", flush=True)


def main(argv: list[str] | None = None) -> int:
    preempt.install()
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, extra = C.parse_args(argv, default_preset="sanity", extra_flags=("slo",))
        S.load(extra.get("slo"))  # a bad SLO file fails before any work
    except (C.ConfigError, OSError, ValueError) as e:
        print(f"hvdtrain.sanity: {e}", file=sys.stderr)
        return exits.REFUSED
    dist.init()
    out: dict = {}

    def go() -> int:
        out.update(run(cfg, extra.get("slo")))
        return exits.OK
    code = session.guarded("hvdtrain.sanity", go, codes={DataError: exits.REFUSED})
    if code:
        return code
    if dist.is_primary():
        write(out)
    # horovodrun kills the other ranks when one exits non-zero: leave together, after rank 0 wrote
    dist.barrier()
    return exits.OK if out["verdict"] == "GO" else exits.FAILED


if __name__ == "__main__":
    preempt.leave(exitmark.mark(main()))  # a late USR1 must not turn a finished check into a killed one
