"""Loader throughput, side by side on the same shards with the same augmentation.

    python -m bench.loader                                  # synthetic 500x375 JPEGs, all loaders
    python -m bench.loader --data DIR --loader dali-cpu --batch-size 64 --threads 2 --seconds 10
    python -m bench.loader --threads 1,2                    # a sweep: every loader at each count

Loaders: `dali-cpu` (DALI CPU backend), `dali-gpu` (mixed decode on a GPU; skipped with
no GPU), `torch` (DataLoader + webdataset + PIL, `--workers` processes), `decode-only`
(DALI decode + fixed resize, no augmentation: the ceiling the others are set against),
`pil-decode` (PIL full decode alone in this process, one core: the machine's anchor,
measured in the same run, for comparing rates across machines).
Each does random-resized crop to --size, flip and normalize, producing float32 CHW.
Images/s is the median of --windows timed windows after --warmup batches; `--threads`
takes a list (DALI threads, and torch workers unless --workers is given). On a GPU the
dali-gpu window is sampled through NVML (hvdtrain/gpumon.py). Prints a table, the SLO
check (loader >= 300 img/s, bench/slo.py), writes runs/<id>/bench-loader.{json,md,png},
then one last line `BENCH_JSON {...}`.
"""
from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from bench import report
from bench import slo as S
from data.wds import Sample, ShardError, open_shards, write_split
from hvdtrain.loader import DaliLoader, TorchLoader
from hvdtrain.pipeline import PipeSpec

LOADERS = ("dali-cpu", "dali-gpu", "torch", "decode-only", "pil-decode")


def make_imagenet_like(out: str, n: int, seed: int = 0) -> str:
    """n JPEGs of 500x375 (quality 90) with smooth structure plus noise: ImageNet-sized."""
    from PIL import Image

    from data.synth import jpeg_bytes

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)

    def gen():
        for i in range(n):
            f = rng.uniform(0.005, 0.05, size=(3, 2))
            img = np.stack([127 + 100 * np.sin(xx * f[c, 0] + yy * f[c, 1] + rng.uniform(0, 6)) for c in range(3)], -1)
            img += rng.normal(0, 20, img.shape)
            yield Sample(f"img{i:06d}", jpeg_bytes(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), 90),
                         int(rng.integers(0, 1000)))
    write_split(gen(), out, [str(i) for i in range(1000)], "bench", shard_size=256,
                extra={"source": "bench.loader synthetic 500x375"})
    return out


def time_batches(it, batch_size: int, warmup: int, windows: int, window_batches: int) -> list[float]:
    """Images/s of each timed window; `warmup` batches are drawn first and not timed."""
    for _ in range(warmup):
        next(it)
    rates = []
    for _ in range(windows):
        t0 = time.perf_counter()
        for _ in range(window_batches):
            b = next(it)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(window_batches * batch_size / (time.perf_counter() - t0))
    del b
    return rates


def pil_decode_batches(shards, batch_size: int):
    """Bare full decode with PIL, one core, bytes already in memory: no I/O, no augmentation."""
    from PIL import Image

    from data.wds import iter_samples

    blobs = [c[e] for p in shards.paths[:2] for _, c in iter_samples(p) for e in c if e != "cls"]
    i = 0
    while True:
        for _ in range(batch_size):
            Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB")
            i += 1
        yield None


def make_iter(name: str, shards, a, threads: int):
    if name == "pil-decode":
        # one core whatever the thread count: measured once, at the sweep's first count
        return pil_decode_batches(shards, a.batch_size) if threads == int(str(a.threads).split(",")[0]) else None
    if name == "torch":
        return TorchLoader(shards, a.batch_size, a.workers or threads, a.size, seed=a.seed).forever()
    if name == "dali-gpu" and not torch.cuda.is_available():
        return None
    spec = PipeSpec(batch_size=a.batch_size, num_threads=threads, shard_id=0, num_shards=1,
                    device_id=0 if name == "dali-gpu" else None, seed=a.seed, size=a.size,
                    views=1, train=True, decode="mixed" if name == "dali-gpu" else "cpu",
                    shuffle_buffer=256, prefetch=2, augment=name != "decode-only")
    return (b.views[0] for b in DaliLoader(shards, spec).forever())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="shard folder or pattern (default: make synthetic 500x375 JPEGs)")
    p.add_argument("--loader", default="all", choices=LOADERS + ("all",))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", default=str(os.cpu_count() or 1), help="DALI threads: N or a list N,M,...")
    p.add_argument("--workers", type=int, default=0, help="torch DataLoader workers (default: = threads)")
    p.add_argument("--run-dir", default="", help="report folder (default runs/bench-loader-<id>)")
    p.add_argument("--size", type=int, default=224, help="output crop side, pixels")
    p.add_argument("--seconds", type=float, default=0, help="target seconds per loader (sets --windows)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window-batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4, help="batches drawn before timing")
    p.add_argument("--images", type=int, default=1024, help="synthetic images when --data is not given")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--slo", help="JSON/TOML file overriding SLO thresholds")
    a = p.parse_args(argv)
    slos = S.load(a.slo)
    tmp = None
    try:
        if not a.data:
            tmp = tempfile.TemporaryDirectory(prefix="hvdtrain-bench-")
            print(f"making {a.images} synthetic 500x375 JPEGs (quality 90) in {tmp.name} ...", flush=True)
            a.data = make_imagenet_like(tmp.name, a.images, a.seed)
        shards = open_shards(a.data)
    except ShardError as e:
        print(f"bench.loader: data error: {e}", file=sys.stderr)
        return 2
    names = [n for n in LOADERS if a.loader in ("all", n)]
    sweep = [int(t) for t in str(a.threads).split(",")]
    results: dict[str, dict] = {}
    error = None
    for threads in sweep:
        for name in names:
            key = name if len(sweep) == 1 else f"{name}@{threads}"
            results[key] = run_one(name, shards, a, threads)
            results[key]["threads"] = threads
            error = error or (f"{key}: {results[key]['error']}" if "error" in results[key] else None)
    print(f"\nloader throughput: {shards.total} images in {len(shards.paths)} shard(s) from {a.data}")
    print(f"batch {a.batch_size}, crop {a.size}, threads {a.threads} (torch workers "
          f"{a.workers or 'same'}), cores {os.cpu_count()}")
    print(f"{'loader':<18} {'img/s (median)':>15} {'per core':>9} {'vs ceiling':>11}  windows")
    for key, r in results.items():
        ceiling = (results.get(key.replace(key.split("@")[0], "decode-only")) or {}).get("img_s")
        r["vs_ceiling"] = r["img_s"] / ceiling if (ceiling and r["img_s"]) else None
        if r["img_s"] is None:
            print(f"{key:<18} {'-':>15}  ({r.get('skipped') or 'error: ' + r.get('error', '')})")
            continue
        ratio = f"{r['vs_ceiling']:.2f}" if r["vs_ceiling"] else "-"
        cores = 1 if key.startswith("pil-decode") else min(r["threads"], os.cpu_count() or 1)
        r["per_core_img_s"] = r["img_s"] / cores
        print(f"{key:<18} {r['img_s']:>15.1f} {r['per_core_img_s']:>9.1f} {ratio:>11}  {len(r['windows'])}")
        if r.get("gpu", {}).get("evaluated"):
            g = r["gpu"]
            print(f"{'':<18} GPU util mean {g['util_mean_pct']:.1f}% p10 {g['util_p10_pct']:.1f}% "
                  f"({g['samples']} samples)")
    best = max((r["img_s"] or 0) for k, r in results.items() if k.startswith(("dali-gpu", "dali-cpu"))) \
        if any(k.startswith("dali") for k in results) else 0
    check = S.check(slos["loader_img_s"], best or None, "the DALI loader was not measured")
    print("\n" + S.table([check], slos))
    result = report.envelope("loader", dict(vars(a)), error, results=results, slos=[check])
    table_md = "\n".join(f"| {k} | {r['threads']} | {r['img_s'] or '-'} | {r.get('vs_ceiling') or '-'} |"
                         for k, r in results.items())

    def chart(path):
        import matplotlib.pyplot as plt

        keys = [k for k, r in results.items() if r["img_s"]]
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
        ax.barh(keys, [results[k]["img_s"] for k in keys])
        ax.set_xlabel(f"images/s (median), crop {a.size}, batch {a.batch_size}")
        ax.set_title(f"bench.loader, {os.cpu_count()} cores", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
    report.publish(a.run_dir, "loader", result, "", chart,
                   markdown="| loader | threads | img/s | vs ceiling |\n|---|---|---|---|\n" + table_md)
    if tmp is not None:
        tmp.cleanup()
    return 1 if error else 0


def run_one(name: str, shards, a, threads: int) -> dict:
    """One loader at one thread count: median images/s of the timed windows."""
    from hvdtrain.gpumon import GpuMonitor

    try:
        it = make_iter(name, shards, a, threads)
        if it is None:
            return {"img_s": None, "skipped": "no GPU" if name == "dali-gpu" else "one core: measured once"}
        mon = GpuMonitor(torch.device("cuda", 0) if name == "dali-gpu" else None)
        windows = a.windows
        if a.seconds:  # calibrate the window count from one window's rate
            first = time_batches(it, a.batch_size, a.warmup, 1, a.window_batches)[0]
            windows = max(3, int(a.seconds * first / (a.batch_size * a.window_batches)))
            mon.start()
            rates = [first] + time_batches(it, a.batch_size, 0, windows - 1, a.window_batches)
        else:
            for _ in range(a.warmup):
                next(it)
            mon.start()
            rates = time_batches(it, a.batch_size, 0, windows, a.window_batches)
        gpu = mon.stop()
        gpu.pop("timeline", None)
        del it
        return {"img_s": statistics.median(rates), "windows": rates, "gpu": gpu}
    except Exception as e:  # noqa: BLE001 - one loader failing must not hide the others
        return {"img_s": None, "error": f"{e.__class__.__name__}: {e}"}


if __name__ == "__main__":
    sys.exit(main())
