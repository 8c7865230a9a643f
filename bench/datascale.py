"""The data layer at ImageNet scale: what a million samples cost before and around training.

    python -m bench.datascale [--data DIR] [--shards 1024] [--per-shard 1251] [--scale 0.125]
                         [--skip launch,stall,make,verify] [--out runs/...]

It generates (or takes with `--data`) an ImageNet-shaped metadata set: `--shards` tars of
`--per-shard` tiny JPEGs each (`.jpg` + `.cls`, written as other tools write them: no
index, no `_info.json`), and measures on the full set and on its `--scale` part (the first
shards), side by side:

- cold index build (no index, no cache; the tars read once first, so both tools find them
  in the page cache): hvdtrain's header walk (`data.shards.ensure_indexes`, 1 and every
  core) against DALI's `wds2idx` (in this process, 1 and every core), on the same tars;
- launch to first step and peak RSS per rank with 1 and 2 ranks (a 1-step contrastive
  `hvdtrain.train`, `--data.shard_shuffle=off`, indexes present), and the same on a
  small set (4 shards), whose RSS is subtracted: what the data set itself costs a rank;
- the epoch-boundary stall with interleaving on and off (a DALI loader of one rank of
  256 over the set: the gap at the boundary minus the median gap between batches);
- `data.make_shards` img/s on 500x375 JPEGs with 1 and 2 workers;
- `data.verify` first and second pass (the second reads only headers: records kept).

Timings on a shared machine are noisy: each figure is one run, the ratios come from runs
side by side. A human table, then one `BENCH_JSON` line.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

from hvdtrain.bench import report as R  # torch only once a report is written: after the pools, which fork
from hvdtrain.data import pool
from hvdtrain.data.files import atomic_file

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = {"rss_ratio_2_vs_1": 0.55, "index_build_s_full": 10.0, "index_vs_wds2idx": 3.0,
           "launch2_full_vs_part": 1.15, "make_2_vs_1": 1.8, "verify_second_vs_first": 0.05}


# ---------------------------------------------------------------- the data set
def _tiny_jpegs(n: int = 64) -> list[bytes]:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=80)
        out.append(buf.getvalue())
    return out


def _write_tar(job: tuple[str, int, int]) -> int:
    path, first, n = job
    jpgs = _tiny_jpegs()
    with atomic_file(path) as raw, tarfile.open(fileobj=raw, mode="w", format=tarfile.USTAR_FORMAT) as t:
        for i in range(first, first + n):
            for ext, data in (("jpg", jpgs[i % len(jpgs)]), ("cls", str(i % 1000).encode())):
                info = tarfile.TarInfo(f"n{i:08d}.{ext}")
                info.size, info.mtime, info.mode = len(data), 0, 0o644
                t.addfile(info, io.BytesIO(data))
    return n


def make_set(out: str, shards: int, per_shard: int) -> list[str]:
    """`shards` tars of `per_shard` samples in `out` (kept: a second bench run reuses them)."""
    os.makedirs(out, exist_ok=True)
    paths = [os.path.join(out, f"imagenet-train-{i:06d}.tar") for i in range(shards)]
    jobs = [(p, i * per_shard, per_shard) for i, p in enumerate(paths) if not os.path.exists(p)]
    if jobs:
        t0 = time.monotonic()
        done = sum(pool.imap(_write_tar, jobs))
        print(f"bench.datascale: wrote {len(jobs)} shard(s), {done} samples in {out} ({time.monotonic() - t0:.0f} s)",
              flush=True)
    return paths


def _clear_indexes(paths: list[str], cache_root: str) -> None:
    for p in paths:
        for idx in (p[:-4] + ".idx",):
            if os.path.exists(idx):
                os.remove(idx)
    shutil.rmtree(cache_root, ignore_errors=True)


def _link_subset(paths: list[str], out: str) -> str:
    """A folder of symlinks to some tars (the 1/8 set, the small set), indexes beside them."""
    shutil.rmtree(out, ignore_errors=True)
    os.makedirs(out)
    for p in paths:
        os.symlink(p, os.path.join(out, os.path.basename(p)))
    return out


# ---------------------------------------------------------------- index builds
def _wds2idx_one(tar: str) -> int:
    from wds2idx import IndexCreator

    with IndexCreator(tar, tar[:-4] + ".wds2idx", verbose=False) as c:
        c.create_index()
    return 1


def index_build(paths: list[str], workers: int, cache_root: str) -> dict:
    from hvdtrain.data import shards

    out = {}
    for p in paths:  # the page cache warm for both tools: whichever ran first would read the disk
        with open(p, "rb") as f:
            while f.read(1 << 24):
                pass
    for w in sorted({1, workers}):
        _clear_indexes(paths, cache_root)
        t0 = time.monotonic()
        shards.ensure_indexes(paths, workers=w)
        out[f"ours_{w}"] = time.monotonic() - t0
        t0 = time.monotonic()
        sum(pool.imap(_wds2idx_one, paths, w))
        out[f"wds2idx_{w}"] = time.monotonic() - t0
    for p in paths:
        os.remove(p[:-4] + ".wds2idx")
    return out


# ---------------------------------------------------------------- launches
def rss_child(argv: list[str]) -> int:
    """`python -m bench.datascale _rank OUT_DIR -- CMD...`: runs one rank's CMD, then writes its peak
    RSS and the seconds from this wrapper's start to the rank's first step line."""
    t0 = time.monotonic()
    out_dir, cmd = argv[0], argv[2:]
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    first = None
    for line in p.stdout:
        sys.stdout.write(line)
        if first is None and re.search(r"\bstep\s+1\b|done: step 1\b", line):
            first = time.monotonic() - t0
    rc = p.wait()
    rank = os.environ.get("HOROVOD_RANK", "0")
    rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    with open(os.path.join(out_dir, f"rank-{rank}.json"), "w") as f:
        json.dump({"rss_mb": rss, "first_step_s": first, "rc": rc}, f)
    return rc


def launch(data: str, ranks: int, work: str, env: dict) -> dict:
    """One 1-step contrastive run: {first_step_s (rank 0), rss_mb per rank, wall_s}."""
    out = tempfile.mkdtemp(dir=work, prefix=f"launch-{ranks}-")
    train = [sys.executable, "-m", "hvdtrain.train", "--preset", "ci", "--task", "contrastive", "--train.steps=1",
             "--train.log_every=1", "--data.shard_shuffle=off", f"--data.train={data}", f"--run.dir={out}/run",
             "--run.progress=False", "--run.tensorboard=False", "--train.eval_every=0"]
    wrap = [sys.executable, "-m", "hvdtrain.bench.datascale", "_rank", out, "--"] + train
    cmd = wrap if ranks == 1 else [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "--gloo", "-np",
                                   str(ranks), "-H", f"localhost:{ranks}"] + wrap
    t0 = time.monotonic()
    r = subprocess.run(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=900)
    wall = time.monotonic() - t0
    recs = [json.load(open(os.path.join(out, f))) for f in sorted(os.listdir(out)) if f.startswith("rank-")]
    if r.returncode != 0 or len(recs) != ranks:
        raise RuntimeError(f"launch with {ranks} rank(s) on {data} failed (exit {r.returncode}):\n{r.stdout[-2000:]}")
    firsts = [x["first_step_s"] for x in recs if x["first_step_s"] is not None]
    return {"first_step_s": min(firsts) if firsts else wall, "rss_mb": [round(x["rss_mb"]) for x in recs],
            "wall_s": wall}


# ---------------------------------------------------------------- the epoch boundary
def boundary_stall(data: str, interleave: bool, per_rank: int = 3200, epochs: int = 3, step_ms: float = 20.0) -> dict:
    """One rank of as many as give each `per_rank` samples (50 batches of 64), reading
    `epochs` epochs behind a `step_ms` training step (a sleep): gaps between batches; the
    stall is the median boundary gap minus the median gap."""
    from hvdtrain.data.shards import open_shards
    from hvdtrain.loader import DaliLoader
    from hvdtrain.pipeline import PipeSpec

    shards = open_shards(data)
    ranks = max(1, shards.total // per_rank)
    spec = PipeSpec(batch_size=64, num_threads=pool.cores(), shard_id=0, num_shards=ranks, device_id=None, seed=1,
                    size=8, views=1, random_crop_flip=True, shuffle=True, shard_shuffle=interleave,
                    order_seed=3, shuffle_buffer=256)
    loader = DaliLoader(shards, spec, drop_last=True)
    gaps, boundary = [], []
    t = time.monotonic()
    for _ in range(epochs):
        first = True
        for _b in loader.epoch_batches():
            time.sleep(step_ms / 1e3)  # the training step the next epoch's build hides behind
            now = time.monotonic()
            (boundary if first else gaps).append(now - t)
            t, first = now, False
    med = statistics.median(gaps)
    return {"ranks": ranks, "median_gap_ms": med * 1e3, "boundary_ms": [round(b * 1e3, 1) for b in boundary[1:]],
            "stall_ms": (statistics.median(boundary[1:]) - med) * 1e3, "batches_per_epoch": len(loader)}


# ---------------------------------------------------------------- make_shards, verify
def make_photos(out: str, n: int = 1000) -> str:
    """`n` 500x375 JPEGs in 4 class folders (smooth images with noise: photo-sized files)."""
    from PIL import Image

    if os.path.isdir(out) and sum(len(f) for _, _, f in os.walk(out)) >= n:
        return out
    rng = np.random.default_rng(1)
    y, x = np.mgrid[0:375, 0:500]
    for i in range(n):
        d = os.path.join(out, f"c{i % 4}")
        os.makedirs(d, exist_ok=True)
        base = (np.stack([x * (i % 7 + 1), y * (i % 5 + 1), x + y], -1) % 256).astype(np.int16)
        img = np.clip(base + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(os.path.join(d, f"img{i:05d}.jpg"), quality=90)
    return out


def make_rates(src: str, work: str, repeats: int = 3) -> dict:
    """`python -m data.make_shards` as a user runs it (its own process: it forks its
    workers, where this process, once it has imported torch, would have to spawn them),
    1 and 2 workers alternated `repeats` times: median img/s of the whole command, and the
    CPU seconds its processes used (user + sys), which tell contention from serial work."""
    n = sum(len(f) for _, _, f in os.walk(src))
    runs: dict[str, list[dict]] = {"1": [], "2": []}
    for _ in range(repeats):
        for w in ("1", "2"):
            out = os.path.join(work, f"made-{w}")
            shutil.rmtree(out, ignore_errors=True)
            before = resource.getrusage(resource.RUSAGE_CHILDREN)
            t0 = time.monotonic()
            subprocess.run([sys.executable, "-m", "data.make_shards", src, out, "--workers", w,
                            "--shard-size", str(max(1, n // 20))], check=True, capture_output=True, text=True)
            wall = time.monotonic() - t0
            after = resource.getrusage(resource.RUSAGE_CHILDREN)
            cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
            runs[w].append({"img_s": round(n / wall, 1), "wall_s": round(wall, 3), "cpu_s": round(cpu, 3)})
    med = {w: statistics.median(r["img_s"] for r in rs) for w, rs in runs.items()}
    return {**med, "images": n, "runs": runs,
            "cpu_s": {w: statistics.median(r["cpu_s"] for r in rs) for w, rs in runs.items()}}


def verify_passes(data: str, workers: int) -> dict:
    from hvdtrain.data import verify

    out = {}
    for name in ("first", "second"):
        t0 = time.monotonic()
        rep = verify.verify(data, workers=workers)
        out[f"{name}_s"] = time.monotonic() - t0
        out["samples"] = rep.splits["train"]["samples"]
    return out


# ---------------------------------------------------------------- the report
def run(a) -> dict:
    cores = pool.cores()
    work = a.out_work or tempfile.mkdtemp(prefix="bench-data-")
    cache_root = os.path.join(work, "cache")
    env = {**os.environ, "HVDTRAIN_CACHE": cache_root, "PYTHONPATH": ROOT}
    os.environ["HVDTRAIN_CACHE"] = cache_root
    full = sorted(os.path.join(a.data, f) for f in os.listdir(a.data) if f.endswith(".tar")) if a.data \
        else make_set(os.path.join(work, "imagenet"), a.shards, a.per_shard)
    part_n = max(1, int(round(len(full) * a.scale)))
    sets = {"full": _link_subset(full, os.path.join(work, "full")),
            "part": _link_subset(full[:part_n], os.path.join(work, "part")),
            "small": _link_subset(full[:4], os.path.join(work, "small"))}
    paths = {k: sorted(os.path.join(v, f) for f in os.listdir(v) if f.endswith(".tar")) for k, v in sets.items()}
    res: dict = {"cores": cores, "samples": {}}
    for k in ("part", "full"):
        res.setdefault("index", {})[k] = index_build(paths[k], cores, cache_root)
        res["samples"][k] = sum(pool.imap(_count, paths[k], cores))
        print(f"bench.datascale: index build {k}: {json.dumps(res['index'][k])}", flush=True)
    from hvdtrain.data import shards

    for k in ("small", "part", "full"):  # indexes present for what follows
        shards.ensure_indexes(paths[k], want_meta=True, workers=cores)
    skip = set(a.skip.split(",")) if a.skip else set()
    sections = {
        "launch": lambda: {k: {str(n): launch(sets[k], n, work, env) for n in (1, 2)} for k in ("small", "part", "full")},
        "make": lambda: make_rates(make_photos(os.path.join(work, "photos"), a.photos), work),
        "verify": lambda: {k: verify_passes(sets[k], cores) for k in (("part",) if a.verify_part_only else ("part", "full"))},
        # last: it imports torch and DALI, after which pools are spawned, not forked
        "stall": lambda: {k: {m: boundary_stall(sets[k], m == "on") for m in ("off", "on")} for k in ("part", "full")},
    }
    return R.run_sections(sections, skip, res, after=lambda name: print(
        f"bench.datascale: {name}: {json.dumps(res.get(name) or res['errors'][name])}", flush=True))


def _count(tar: str) -> int:
    from hvdtrain.data.tarindex import read_index_count

    return read_index_count(tar[:-4] + ".idx") if os.path.exists(tar[:-4] + ".idx") else 0


def checks(res: dict) -> list[tuple[str, str, float, str]]:
    """(target, measured, value, met) rows."""
    rows = []
    ix = res["index"]["full"]
    c = res["cores"]
    rows.append(("cold index build, full set", f"{ix[f'ours_{c}']:.1f} s", ix[f"ours_{c}"],
                 "met" if ix[f"ours_{c}"] <= TARGETS["index_build_s_full"] else "NOT met"))
    best_w = min(v for k, v in ix.items() if k.startswith("wds2idx"))
    ratio = best_w / ix[f"ours_{c}"]
    rows.append(("vs wds2idx (its best)", f"{ratio:.1f}x faster", ratio,
                 "met" if ratio >= TARGETS["index_vs_wds2idx"] else "NOT met"))
    if "launch" in res:
        L = res["launch"]
        per = {n: max(L["full"][n]["rss_mb"]) - max(L["small"][n]["rss_mb"]) for n in ("1", "2")}
        ratio = per["2"] / per["1"] if per["1"] > 0 else float("nan")
        rows.append(("reader RSS above small set, 2 ranks / 1 rank", f"{per['2']} / {per['1']} MB = {ratio:.2f}",
                     ratio, "met" if ratio <= TARGETS["rss_ratio_2_vs_1"] else "NOT met"))
        ratio = L["full"]["2"]["first_step_s"] / L["part"]["2"]["first_step_s"]
        rows.append(("launch to first step, 2 ranks, full / part", f"{ratio:.2f}", ratio,
                     "met" if ratio <= TARGETS["launch2_full_vs_part"] else "NOT met"))
    if "make" in res:
        ratio = res["make"]["2"] / res["make"]["1"]
        rows.append(("make_shards 2 workers / 1", f"{ratio:.2f}x", ratio,
                     "met" if ratio >= TARGETS["make_2_vs_1"] else "NOT met"))
    if "verify" in res:
        v = res["verify"].get("full") or res["verify"]["part"]
        ratio = v["second_s"] / v["first_s"]
        rows.append(("verify second pass / first", f"{ratio * 100:.1f} %", ratio,
                     "met" if ratio <= TARGETS["verify_second_vs_first"] else "NOT met"))
    return rows


def table(res: dict) -> str:
    c = res["cores"]
    n = res["samples"]
    lines = [f"bench.datascale on {c} core(s): full = {n['full']} samples, part = {n['part']} samples",
             "", f"{'':44s} {'part':>12s} {'full':>12s}"]

    def row(label, fn):
        try:
            lines.append(f"{label:44s} {fn('part'):>12s} {fn('full'):>12s}")
        except KeyError:
            pass
    for w in sorted({1, c}):
        row(f"index build, ours, {w} worker(s) [s]", lambda k, w=w: f"{res['index'][k][f'ours_{w}']:.2f}")
        row(f"index build, wds2idx, {w} worker(s) [s]", lambda k, w=w: f"{res['index'][k][f'wds2idx_{w}']:.2f}")
    if "launch" in res:
        for r in ("1", "2"):
            row(f"launch to first step, {r} rank(s) [s]", lambda k, r=r: f"{res['launch'][k][r]['first_step_s']:.1f}")
            row(f"peak RSS per rank, {r} rank(s) [MB]", lambda k, r=r: "/".join(map(str, res["launch"][k][r]["rss_mb"])))
        sm = res["launch"]["small"]
        lines.append(f"{'(small set, 4 shards: RSS 1 rank / 2 ranks)':44s} "
                     f"{max(sm['1']['rss_mb']):>6d} / {max(sm['2']['rss_mb'])} MB")
    if "stall" in res:
        for m in ("off", "on"):
            row(f"epoch-boundary stall, interleave {m} [ms]", lambda k, m=m: f"{res['stall'][k][m]['stall_ms']:.0f}")
    if "verify" in res:
        for p in ("first", "second"):
            row(f"data.verify {p} pass [s]", lambda k, p=p: f"{res['verify'][k][f'{p}_s']:.2f}")
    if "make" in res:
        m = res["make"]
        lines.append(f"{'make_shards 500x375 JPEGs, 1 / 2 workers':44s} {m['1']:.0f} / {m['2']:.0f} img/s"
                     + (f" (CPU {m['cpu_s']['1']:.2f} / {m['cpu_s']['2']:.2f} s)" if "cpu_s" in m else ""))
    lines += ["", f"{'target':48s} {'measured':>26s}  verdict"]
    lines += [f"{t:48s} {m:>26s}  {v}" for t, m, _, v in checks(res)]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "_rank":
        return rss_child(argv[1:])
    p = argparse.ArgumentParser(prog="python -m bench.datascale", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="a folder of tars to measure (default: generate the ImageNet-shaped set)")
    p.add_argument("--shards", type=int, default=1024)
    p.add_argument("--per-shard", type=int, default=1251)
    p.add_argument("--scale", type=float, default=0.125, help="the part set: this share of the shards")
    p.add_argument("--photos", type=int, default=2000, help="500x375 JPEGs for the make_shards rate")
    p.add_argument("--skip", default="", help="comma list of launch,stall,make,verify")
    p.add_argument("--verify-part-only", action="store_true", help="data.verify on the part set only")
    p.add_argument("--work", dest="out_work", default="", help="scratch folder (kept: the set is reused)")
    p.add_argument("--out", default="", help="report folder (default runs/<id>)")
    a = p.parse_args(argv)
    cfg = {k: v for k, v in vars(a).items()}
    try:
        res = run(a)
        err = None
    except Exception as e:  # noqa: BLE001 - the report says what failed
        res, err = {}, f"{e.__class__.__name__}: {e}"
    if res.get("errors"):
        err = "; ".join(f"{k}: {v}" for k, v in res["errors"].items())

    text = table(res) if res else f"bench.datascale failed: {err}"
    print(text, flush=True)
    result = R.envelope("data", cfg, err, results=res,
                        checks=[{"target": t, "measured": m, "verdict": v} for t, m, _, v in checks(res)] if res else [])
    R.publish(a.out, "data", result, text)
    return 0 if err is None else 1


if __name__ == "__main__":
    sys.exit(main())
