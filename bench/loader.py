"""Loader throughput, side by side on the same shards with the same augmentation.

    python -m bench.loader                                  # synthetic 500x375 JPEGs, all loaders
    python -m bench.loader --data DIR --loader dali-cpu --batch-size 64 --threads 2 --seconds 10

Loaders: `dali-cpu` (DALI CPU backend), `dali-gpu` (mixed decode on a GPU; skipped with
no GPU), `torch` (DataLoader + webdataset + PIL, `--workers` processes), `decode-only`
(DALI decode + fixed resize, no augmentation: the ceiling the others are set against).
Each does random-resized crop to --size, flip and normalize, producing float32 CHW.
Images/s is the median of --windows timed windows after --warmup batches. Prints a
table, the SLO check (loader >= 300 img/s, bench/slo.py), then one last line
`BENCH_JSON {...}`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import numpy as np
import torch

from bench import slo as S
from data.wds import Sample, ShardError, open_shards, write_split
from hvdtrain import provenance
from hvdtrain.loader import DaliLoader, TorchLoader
from hvdtrain.pipeline import PipeSpec

LOADERS = ("dali-cpu", "dali-gpu", "torch", "decode-only")


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


def make_iter(name: str, shards, a, threads: int):
    if name == "torch":
        return TorchLoader(shards, a.batch_size, a.workers, a.size, seed=a.seed).forever()
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
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="DALI threads")
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="torch DataLoader workers")
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
    results: dict[str, dict] = {}
    error = None
    for name in names:
        try:
            it = make_iter(name, shards, a, a.threads)
            if it is None:
                results[name] = {"img_s": None, "skipped": "no GPU"}
                continue
            windows = a.windows
            if a.seconds:  # calibrate the window count from one window's rate
                first = time_batches(it, a.batch_size, a.warmup, 1, a.window_batches)[0]
                windows = max(3, int(a.seconds * first / (a.batch_size * a.window_batches)))
                rates = [first] + time_batches(it, a.batch_size, 0, windows - 1, a.window_batches)
            else:
                rates = time_batches(it, a.batch_size, a.warmup, windows, a.window_batches)
            results[name] = {"img_s": statistics.median(rates), "windows": rates}
            del it
        except Exception as e:  # noqa: BLE001 - one loader failing must not hide the others
            error = f"{name}: {e.__class__.__name__}: {e}"
            results[name] = {"img_s": None, "error": str(e)}
    ceiling = (results.get("decode-only") or {}).get("img_s")
    print(f"\nloader throughput: {shards.total} images in {len(shards.paths)} shard(s) from {a.data}")
    print(f"batch {a.batch_size}, crop {a.size}, DALI threads {a.threads}, torch workers {a.workers}, "
          f"cores {os.cpu_count()}")
    print(f"{'loader':<12} {'img/s (median)':>15} {'per core':>9} {'vs ceiling':>11}  windows")
    for name, r in results.items():
        if r["img_s"] is None:
            print(f"{name:<12} {'-':>15}  ({r.get('skipped') or 'error: ' + r.get('error', '')})")
            continue
        ratio = f"{r['img_s'] / ceiling:.2f}" if ceiling else "-"
        print(f"{name:<12} {r['img_s']:>15.1f} {r['img_s'] / (os.cpu_count() or 1):>9.1f} {ratio:>11}  "
              f"{len(r['windows'])}")
    main_rate = (results.get("dali-gpu") or {}).get("img_s") or (results.get("dali-cpu") or {}).get("img_s")
    check = S.check(slos["loader_img_s"], main_rate, "the DALI loader was not measured")
    print("\n" + S.table([check], slos))
    code = provenance.code_state()
    print("BENCH_JSON " + json.dumps({
        "bench": "loader", "results": {k: {kk: vv for kk, vv in v.items()} for k, v in results.items()},
        "ceiling_img_s": ceiling, "slos": [check],
        "config": {k: v for k, v in vars(a).items()}, "versions": provenance.versions(),
        "git_sha": code["git_sha"], "git_dirty": code["git_dirty"], "cores": os.cpu_count(),
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu", "error": error}))
    if tmp is not None:
        tmp.cleanup()
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
