"""Loader throughput, side by side on the same shards, against an honest ceiling.

    python -m bench.loader                                  # synthetic 500x375 JPEGs, all loaders
    python -m bench.loader --data DIR --loader dali-cpu --batch-size 64 --threads 2 --seconds 10
    python -m bench.loader --threads 1,2                    # a sweep: every loader at each count
    python -m bench.loader --hw-decoder-load 0,0.65,0.9,0.99 --threads 4,8,16    # a GPU sweep
    python -m bench.loader --tune [--tune-seconds 60]       # pick threads / prefetch (/ hw load)
    python -m bench.loader --make-data DIR [--images 1024]  # only write the synthetic set, for --data DIR
    python -m bench.loader --data s3://bucket/prefix/ --loader dali-cpu [--remote direct] [--cache-gb 50]

Loaders, each built from the same config the training uses (`pipeline.spec_from_config`:
single-view random-resized crop + flip, normalize as training does it):
`dali-cpu` (DALI CPU decode: normalized in DALI's threads on a machine with no GPU; on a
GPU node uint8 crops go to the GPU and kernels.normalize runs there), `dali-gpu` (mixed
decode on a GPU; skipped with no GPU), `torch` (DataLoader + PIL, `--workers` or
`--threads` workers, `hvdtrain.torch_loader`), `ceiling` (the work no loader can skip, on
the same device: the same reader and the same decoder call with the same random crops,
its output dropped inside the pipeline; no resize, no normalize, no transfer; measured
beside every loader at its setting, asked for or not), `pil-decode` (PIL's bare full decode, one core, bytes in
memory: the cross-machine anchor), `synthetic` (`--data.loader=synthetic`'s loader: random
batches of the same shape made once on the training device and cycled, no reader: the
loop's input with no data work, a bound no real loader reaches). Each loader is reported as a fraction of its
device's ceiling at the same setting: at most 1 by construction, so a value above 1.05
is flagged as a bench bug. Images/s is the median of --windows timed windows after
--warmup batches (each window's rate is printed; `*` marks a window a pipeline rebuild
fell in: the DALI loader rebuilds at every epoch end when it interleaves shards, which it
does, as training does, only for shards not written shuffled); `cores` is the CPU time
the loader's process (and workers) used per second of wall time. SIGINT ends the sweep:
the settings measured so far are reported, with the interruption as the error. Prints a table and the SLO check (loader >= 300 img/s,
hvdtrain/slo.py), writes runs/<id>/bench-loader.{json,md,png}, then one last line
`BENCH_JSON {...}`.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

from hvdtrain.bench import report
from hvdtrain.bench.loader_runs import make_imagenet_like, run_one
from hvdtrain.data.shards import open_shards
from hvdtrain.data.tarindex import ShardError
from hvdtrain import exitmark
from hvdtrain import slo as S

LOADERS = ("dali-cpu", "dali-gpu", "torch", "ceiling", "pil-decode", "synthetic")
ABOVE_CEILING = 1.05  # a loader this far above its ceiling means the bench measured something wrong


def settings(a) -> list[tuple[str, int, float | None]]:
    """(loader, threads, hw load) to measure, in order. Every loader is measured beside its
    ceiling at the same setting, asked for or not: dali-cpu and torch (at its worker count)
    beside ceiling-cpu, dali-gpu beside ceiling-gpu."""
    names = [n for n in LOADERS if a.loader in ("all", n)]
    sweep = [int(t) for t in str(a.threads).split(",")]
    loads = [float(x) for x in str(a.hw_decoder_load).split(",")] if a.hw_decoder_load else [None]
    out = []
    for t in sweep:
        for n in names:
            if n in ("pil-decode", "synthetic") and t != sweep[0]:
                continue  # no threads to sweep (one core; no reader): measured once
            if n == "ceiling":
                out.append(("ceiling-cpu", t, None))
                out += [("ceiling-gpu", t, h) for h in loads]
            elif n == "dali-gpu":
                out += [(n, t, h) for h in loads]
            else:
                out.append((n, a.workers or t if n == "torch" else t, None))
    for n, t, h in list(out):
        need = {"dali-cpu": ("ceiling-cpu", t, None), "torch": ("ceiling-cpu", t, None),
                "dali-gpu": ("ceiling-gpu", t, h)}.get(n)
        if need and need not in out:
            out.append(need)
    return out


def key_of(name: str, threads: int, hw, multi: bool) -> str:
    return name + (f"@{threads}" if multi else "") + (f",hw{hw:g}" if hw is not None and multi else "")


def compare(results: dict) -> str | None:
    """Each loader as a fraction of its device's ceiling at the same setting; an error if
    one is above it (the ceiling must bound what it is compared with)."""
    bad = []
    for key, r in results.items():
        ck = r.get("ceiling_key")
        c = results.get(ck, {}).get("img_s") if ck else None
        r["vs_ceiling"] = r["img_s"] / c if (c and r.get("img_s")) else None
        if r["vs_ceiling"] is not None and r["vs_ceiling"] > ABOVE_CEILING:
            bad.append(f"{key} runs at {r['vs_ceiling']:.2f}x its ceiling {ck}")
    return ("bench bug: a ceiling does not bound its loader: " + "; ".join(bad)) if bad else None


def measure_all(shards, a) -> tuple[dict, str | None]:
    """Every setting of the sweep; on KeyboardInterrupt (SIGINT: gpucheck's step
    timeout) the ones measured so far, with the interruption as the error."""
    plan = settings(a)
    multi = len({t for _, t, _ in plan}) > 1 or len({h for _, _, h in plan if h is not None}) > 1
    results: dict[str, dict] = {}
    error = None
    for i, (name, threads, hw) in enumerate(plan):
        key = key_of(name, threads, hw, multi)
        try:
            r = run_one(name, shards, a, threads, hw)
        except KeyboardInterrupt:
            error = f"interrupted (SIGINT) at {key}, after {i} of {len(plan)} settings: the rest were not measured"
            print(f"\nbench.loader: {error}", flush=True)
            break
        r.update(loader=name, threads=threads, hw_decoder_load=hw)
        if name in ("dali-cpu", "torch"):
            r["ceiling_key"] = key_of("ceiling-cpu", threads, None, multi)
        elif name == "dali-gpu":
            r["ceiling_key"] = key_of("ceiling-gpu", threads, hw, multi)
        results[key] = r
        error = error or (f"{key}: {r['error']}" if "error" in r else None)
    return results, "; ".join(e for e in (error, compare(results)) if e) or None


def window_cells(r: dict) -> str:
    """Each window's images/s, `*` after one a pipeline rebuild fell in."""
    marks = r.get("window_rebuilds") or [0] * len(r["windows"])
    return " ".join(f"{w:.0f}" + ("*" if n else "") for w, n in zip(r["windows"], marks))


def print_table(results: dict, shards, a) -> None:
    cores = os.cpu_count() or 1
    print(f"\nloader throughput: {shards.total} images in {len(shards.paths)} shard(s) from {a.data}")
    print(f"batch {a.batch_size}, crop {a.size}, min scale {a.min_scale}, threads {a.threads} (torch workers "
          f"{a.workers or 'same'}), prefetch {a.prefetch}, machine cores {cores}")
    print(f"{'loader':<24} {'img/s (median)':>15} {'per core':>9} {'cores used':>11} {'vs ceiling':>11}  "
          f"windows img/s (* a pipeline rebuild fell in it)")
    for key, r in results.items():
        if r["img_s"] is None:
            print(f"{key:<24} {'-':>15}  ({r.get('skipped') or 'error: ' + r.get('error', '')})")
            continue
        given = 1 if r["loader"] == "pil-decode" else min(r["threads"], cores)
        r["per_core_img_s"] = r["img_s"] / given
        ratio = f"{r['vs_ceiling']:.2f}" if r.get("vs_ceiling") else "-"
        print(f"{key:<24} {r['img_s']:>15.1f} {r['per_core_img_s']:>9.1f} {r['cpu_cores_used']:>11.2f} "
              f"{ratio:>11}  {window_cells(r)}")
        if r.get("gpu", {}).get("evaluated"):
            g = r["gpu"]
            print(f"{'':<24} GPU util mean {g['util_mean_pct']:.1f}% p10 {g['util_p10_pct']:.1f}% "
                  f"({g['samples']} samples)")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m bench.loader", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="shard folder or pattern (default: make synthetic 500x375 JPEGs)")
    p.add_argument("--loader", default="all", choices=LOADERS + ("all",))
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", default=str(os.cpu_count() or 1), help="DALI threads: N or a list N,M,...")
    p.add_argument("--hw-decoder-load", default="", help="dali-gpu: hw_decoder_load, a list (default: config's)")
    p.add_argument("--prefetch", type=int, default=2, help="DALI prefetch queue depth, batches")
    p.add_argument("--workers", type=int, default=0, help="torch DataLoader workers (default: = threads)")
    p.add_argument("--run-dir", default="", help="report folder (default runs/bench-loader-<id>)")
    p.add_argument("--size", type=int, default=224, help="output crop side, pixels")
    p.add_argument("--min-scale", type=float, default=0.25, help="random-resized-crop area lower bound")
    p.add_argument("--seconds", type=float, default=0, help="target seconds per loader (sets --windows)")
    p.add_argument("--windows", type=int, default=5)
    p.add_argument("--window-batches", type=int, default=8)
    p.add_argument("--warmup", type=int, default=4, help="batches drawn before timing")
    p.add_argument("--images", type=int, default=1024, help="synthetic images when --data is not given")
    p.add_argument("--make-data", metavar="DIR", default="",
                   help="only write --images synthetic 500x375 JPEGs into DIR (for --data DIR) and exit")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--window-shards", type=int, default=0, help="reader windows of N shards (training's "
                                                                "--data.window_shards; 0: 8 for bucket data)")
    p.add_argument("--remote", default="cache", choices=["cache", "direct"], help="bucket data: through the node "
                                                                                  "cache, or read by DALI itself")
    p.add_argument("--cache-dir", default="", help="bucket data: the node's shard cache (--data.cache_dir)")
    p.add_argument("--cache-gb", type=float, default=0.0, help="bucket data: its bound, GB (--data.cache_gb)")
    p.add_argument("--slo", help="JSON/TOML file overriding SLO thresholds")
    p.add_argument("--tune", action="store_true", help="try threads, prefetch (and hw load on a GPU); print the "
                                                       "best as config overrides (bench/tune.py)")
    p.add_argument("--tune-seconds", type=float, default=60, help="--tune's time budget, seconds")
    return p


def main(argv: list[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if a.make_data:
        print(f"making {a.images} synthetic 500x375 JPEGs (quality 90) in {a.make_data} ...", flush=True)
        make_imagenet_like(a.make_data, a.images, a.seed)
        return 0
    slos = S.load(a.slo)
    tmp = None
    try:
        if not a.data:
            tmp = tempfile.TemporaryDirectory(prefix="hvdtrain-bench-")
            print(f"making {a.images} synthetic 500x375 JPEGs (quality 90) in {tmp.name} ...", flush=True)
            a.data = make_imagenet_like(tmp.name, a.images, a.seed)
        from hvdtrain.data import nodecache

        shards = open_shards(a.data, remote=nodecache.Options(mode=a.remote, cache_dir=a.cache_dir,
                                                              cache_gb=a.cache_gb))
    except ShardError as e:
        print(f"bench.loader: data error: {e}", file=sys.stderr)
        return 2
    try:
        if a.tune:
            from hvdtrain.bench import tune

            return tune.main(shards, a)
        return report_all(shards, a, slos)
    finally:
        if tmp is not None:
            tmp.cleanup()


def report_all(shards, a, slos) -> int:
    results, error = measure_all(shards, a)
    print_table(results, shards, a)
    if error:
        print(f"\nERROR: {error}")
    best = max((r["img_s"] or 0 for r in results.values() if r["loader"] in ("dali-cpu", "dali-gpu")), default=0)
    check = S.check(slos["loader_img_s"], best or None, "the DALI loader was not measured")
    print("\n" + S.table([check], slos))
    result = report.envelope("loader", dict(vars(a)), error, results=results, slos=[check])
    rows = "\n".join(f"| {k} | {r['threads']} | {r.get('hw_decoder_load') or '-'} | {r['img_s'] or '-'} | "
                     f"{r.get('cpu_cores_used') or '-'} | {r.get('vs_ceiling') or '-'} | "
                     f"{window_cells(r) if r.get('windows') else '-'} |" for k, r in results.items())

    def chart(plt):
        keys = [k for k, r in results.items() if r["img_s"]]
        fig, ax = plt.subplots(figsize=(6, 0.5 + 0.3 * len(keys)), dpi=110)
        ax.barh(keys, [results[k]["img_s"] for k in keys])
        ax.set_xlabel(f"images/s (median), crop {a.size}, batch {a.batch_size}")
        ax.set_title(f"bench.loader, {os.cpu_count()} cores", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
        return fig
    report.publish(a.run_dir, "loader", result, "", chart,
                   markdown="| loader | threads | hw load | img/s | cores used | vs ceiling | windows (* rebuilt) |\n"
                            "|---|---|---|---|---|---|---|\n" + rows)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(exitmark.mark(main()))
