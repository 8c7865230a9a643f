"""Shards in a bucket against the same shards on local disk, side by side in one run.

    python -m bench.remote --s3 s3://bucket/bench/ [--gs gs://bucket/bench/] [--server-log moto.log]
                           [--images 1024] [--launch-shards 1024 --launch-per-shard 1251] [--skip launch,...]

It uploads (once) what it measures: `--images` 500x375 JPEGs (bench.loader's set) in
shards of `--shard-size`, and bench.datascale's ImageNet-shaped set of `--launch-shards` tars,
then measures:

- **loader**: dali-cpu img/s (bench.loader's timing: median of windows after a warm-up of
  one epoch) on local disk (one pipeline per epoch; and in the windows bucket data is
  read in), through the node cache (a cache of 3/4 of the set: fetching goes on while it
  reads), local and s3 alternated `--rounds` times (the median round of each is
  reported); the same through the cache from an empty cache (a warm-up of 4 batches: the
  first epoch), read directly by DALI (`--data.remote=direct`), and gs:// through the
  cache;
- **GET requests per sample read**: from the server's request log (`--server-log`, the
  file a loopback moto_server logs to), else from the client's own count (cache only);
- **launch to first step** of a 1-step, 1-rank `hvdtrain.train` on the launch set, indexes
  cached, local against the bucket;
- **bytes per epoch**: two ranks' loaders (rank 0 and 1 of 2, windows of 2 shards)
  sharing the node's cache, 3 epochs with a cache of half the set, then 2 epochs with a
  cache that holds it all: bytes (and GETs) the node fetched during each epoch against
  the bytes its ranks read (samples read x the set's mean bytes per sample, members and
  their tar headers). The fetcher works ahead, so epoch 1 also holds the next epoch's
  first shards. The largest size the cache folder reached, sampled every 5 ms, against
  its bound;
- **clients** (`--skip` it to leave out): whole-shard downloads of the set with boto3
  ranged GETs (what hvdtrain uses), boto3's transfer manager, and s3fs / gcsfs where
  installed; the same for google-cloud-storage.

Credentials and endpoints come from the environment (the providers' chains). A human
table, then one `BENCH_JSON` line.
"""
from __future__ import annotations

import argparse
import itertools
import os
import re
import shutil
import statistics
import sys
import tempfile
import time


TARGETS = {"cache_vs_local": 0.9, "gets_per_sample": 0.01, "launch_vs_local": 1.2, "fetched_vs_read": 1.05}


_GET = re.compile(r'"(?:\x1b\[[0-9;]*m)*GET ')  # werkzeug's request line, colour codes and all


def log_gets(path: str | None) -> int | None:
    """GET request lines in a server's log so far (moto_server's werkzeug format)."""
    if not path:
        return None
    with open(path, errors="replace") as f:
        return sum(bool(_GET.search(line)) for line in f)


def upload_folder(folder: str, url: str) -> None:
    """Put the folder's files under `url` unless the bucket has them (same size)."""
    from hvdtrain.data import remote

    store = remote.store_for(url)
    try:
        have = {o.name: o.size for o in store.list(url)}
    except remote.RemoteError:
        have = {}
    for name in sorted(os.listdir(folder)):
        p = os.path.join(folder, name)
        if os.path.isfile(p) and have.get(name) != os.path.getsize(p):
            store.put_file(p, url + name)


def loader_line(spec: str, a, cache_gb: float, remote_mode: str = "cache", gets_log=None,
                window_shards: int | None = None, windows: int | None = None, warmup: int = 4) -> dict:
    """dali-cpu img/s on `spec`, and GETs per sample read (server log, else client count)."""
    from hvdtrain.bench.loader import parser
    from hvdtrain.bench.loader_runs import run_one
    from hvdtrain.data import nodecache
    from hvdtrain.data.shards import open_shards
    from hvdtrain.data.store import COUNTERS

    opts = nodecache.Options(mode=remote_mode, cache_dir=tempfile.mkdtemp(prefix="bench-remote-cache-"),
                             cache_gb=cache_gb)
    shards = open_shards(spec, remote=opts)
    la = parser().parse_args(["--threads", str(a.threads), "--batch-size", str(a.batch_size),
                              "--windows", str(windows or a.windows), "--window-batches", "8", "--warmup", str(warmup),
                              "--data", spec,
                              "--window-shards", str(a.window_shards if window_shards is None else window_shards)])
    g0, c0 = log_gets(gets_log), COUNTERS.snapshot()["gets"]
    server = server_process(spec)
    s0, t0 = cpu_s(server), time.monotonic()
    r = run_one("dali-cpu", shards, la, a.threads)
    server_cores = (cpu_s(server) - s0) / (time.monotonic() - t0) if server else None
    read = (la.warmup + la.windows * la.window_batches) * la.batch_size
    logged = log_gets(gets_log)
    gets = (logged - g0) if logged is not None else COUNTERS.snapshot()["gets"] - c0
    nodecache.close_all()
    return {"img_s": r.get("img_s"), "windows": r.get("windows"), "error": r.get("error"), "samples_read": read,
            "gets": gets, "gets_per_sample": gets / read, "gets_from": "server log" if logged is not None else "client",
            "cpu_cores_used": r.get("cpu_cores_used"), "server_cores_used": server_cores}


def server_process(spec: str):
    """The local process serving the bucket's endpoint (a loopback server), or None."""
    import psutil

    if not spec.startswith(("s3://", "gs://")):
        return None
    url = os.environ.get("AWS_ENDPOINT_URL" if spec.startswith("s3://") else "STORAGE_EMULATOR_HOST", "")
    port = url.rsplit(":", 1)[-1].strip("/")
    if not port.isdigit():
        return None
    for c in psutil.net_connections("tcp"):
        if c.status == psutil.CONN_LISTEN and c.laddr.port == int(port) and c.pid:
            return psutil.Process(c.pid)
    return None


def cpu_s(p) -> float:
    if p is None:
        return 0.0
    t = p.cpu_times()
    return t.user + t.system


def alternated(rounds: int, **lines) -> dict:
    """Each line measured `rounds` times, the lines alternated (a noisy machine drifts):
    the round with the median img/s of each, with every round's figure beside it."""
    got: dict[str, list] = {k: [] for k in lines}
    for _ in range(rounds):
        for k, fn in lines.items():
            got[k].append(fn())
    out = {}
    for k, runs in got.items():
        ok = sorted((r for r in runs if r.get("img_s")), key=lambda r: r["img_s"])
        out[k] = {**(ok[len(ok) // 2] if ok else runs[-1]), "rounds_img_s": [r.get("img_s") for r in runs]}
    return out


def epochs_bytes(spec: str, cache_gb: float, epochs: int, gets_log: str | None = None) -> dict:
    """Two ranks' DALI loaders (rank 0 and 1 of 2, one process, one node cache) read
    `epochs` epochs in step; per epoch: bytes the node fetched, and the bytes of the
    shard ranges their samples lie in (each sample: its first header to its last byte)."""
    from hvdtrain.data import nodecache
    from hvdtrain.data.shards import open_shards
    from hvdtrain.data.tarindex import read_index
    from hvdtrain import config as C
    from hvdtrain import pipeline
    from hvdtrain.loader import DaliLoader

    opts = nodecache.Options(cache_dir=tempfile.mkdtemp(prefix="bench-remote-epochs-"), cache_gb=cache_gb)
    shards = open_shards(spec, remote=opts)
    cfg = C.preset("ci")
    cfg.train.task, cfg.train.batch_size, cfg.data.size, cfg.data.threads = "classify", 32, 64, 1
    cfg.data.window_shards = 2  # two ranks each hold two windows (<= 3 shards each) of a 16-shard cache
    from concurrent.futures import ThreadPoolExecutor

    def make(r):
        return DaliLoader(shards, pipeline.spec_from_config(cfg, "train", rank=r, size=2, threads=1,
                                                            written_shuffled=shards.shuffled, remote=True))
    with ThreadPoolExecutor(2) as ex:  # as ranks do: at about the same time
        loaders = list(ex.map(make, (0, 1)))
    nc = nodecache.get(opts)
    w = nodecache.Watch(nc.root, every_s=0.005)
    out = []
    for _ in range(epochs):
        before, g0 = nc.stats().get("bytes", 0), log_gets(gets_log)
        spans = 0
        for batches in itertools.zip_longest(*(ld.epoch_batches() for ld in loaders)):  # each to its epoch's end
            spans += sum(len(b.labels) for b in batches if b is not None)
        time.sleep(1.2)  # the fetcher writes its counters once a second
        fetched = nc.stats().get("bytes", 0) - before
        g1 = log_gets(gets_log)
        out.append({"fetched_bytes": fetched, "samples": spans, "evicted": nc.stats().get("evicted", 0),
                    "gets": None if g0 is None else g1 - g0})
    per_sample = sum(sum(n for _, _, n, _ in comps) + 512 * len(comps)
                     for idx in shards.index_paths for comps in read_index(idx)) / shards.total
    for e in out:
        e["read_bytes"] = round(e["samples"] * per_sample)
        e["ratio"] = e["fetched_bytes"] / e["read_bytes"] if e["read_bytes"] else None
    for ld in loaders:
        ld.close()
    top = w.stop()
    nc.close()
    nodecache.close_all()
    return {"epochs": out, "max_held_bytes": top, "bound_bytes": nc.bound, "set_bytes": sum(o.size for o in
                                                                                           shards.objects.values())}


def clients(spec: str, rounds: int) -> dict:
    """Seconds to download every shard of the set with each client (8 at a time), the
    clients alternated `rounds` times (a noisy machine drifts): the median round of each,
    every round beside it. A client whose first round takes over 30 s runs once."""
    from concurrent.futures import ThreadPoolExecutor

    from hvdtrain.data import nodecache, remote

    objs, _ = remote.resolve(spec)
    total = sum(o.size for o in objs)
    bucket_key = [(o.url.split("/")[2], o.url.split("/", 3)[3]) for o in objs]
    dest = tempfile.mkdtemp(prefix="bench-clients-dl-")
    files = [os.path.join(dest, o.name) for o in objs]
    res: dict = {}

    def fsspec(module: str, cls: str, **kw):
        """An fsspec file system that has listed the prefix once (untimed: gcsfs's first
        call against an emulator waits out a gRPC probe), or None where not installed."""
        try:
            fs = getattr(__import__(module), cls)(**kw)
        except ImportError as e:
            res[module] = {"skipped": f"not installed ({e.name})"}
            return None
        fs.ls(spec)
        return fs

    def hvdtrain_get():
        nodecache.get(nodecache.Options(cache_dir=dest)).fetch("clients", objs)
        nodecache.close_all()

    def pool(get):
        with ThreadPoolExecutor(8) as ex:
            list(ex.map(get, bucket_key, files))

    lines = {"hvdtrain (ranged GETs, 16 MiB)": hvdtrain_get}
    store = remote.store_for(spec)
    if spec.startswith("s3://"):
        lines["boto3 transfer manager"] = lambda: pool(lambda bk, f: store.client().download_file(*bk, f))
        fs = fsspec("s3fs", "S3FileSystem", endpoint_url=os.environ.get("AWS_ENDPOINT_URL"))
        if fs is not None:
            lines["s3fs"] = lambda: fs.get([o.url for o in objs], files)
    else:
        lines["google-cloud-storage download_to_filename"] = lambda: pool(
            lambda bk, f: store.client().bucket(bk[0]).blob(bk[1]).download_to_filename(f))
        gfs = fsspec("gcsfs", "GCSFileSystem", endpoint_url=os.environ.get("STORAGE_EMULATOR_HOST"),
                     token="anon" if os.environ.get("STORAGE_EMULATOR_HOST") else None)
        if gfs is not None:
            lines["gcsfs"] = lambda: gfs.get([o.url for o in objs], files)
    took: dict[str, list[float]] = {k: [] for k in lines}
    for _ in range(rounds):
        for name, fn in lines.items():
            if took[name] and took[name][0] > 30:
                continue
            t0 = time.monotonic()
            fn()
            took[name].append(time.monotonic() - t0)
            shutil.rmtree(dest)  # each client writes into an empty folder
            os.makedirs(dest)
    for name, ts in took.items():
        med = statistics.median(ts)
        res[name] = {"s": med, "mb_s": total / 1e6 / med, "rounds_s": ts}
    return {"set_bytes": total, **res}


def launches(a, work: str) -> dict:
    """1-step, 1-rank runs on bench.datascale's set, local and in the bucket (indexes cached),
    alternated `a.repeats` times: the median seconds from start to the first step."""
    from hvdtrain.bench.datascale import launch, make_set
    from hvdtrain.data import shards

    folder = os.path.join(work, "imagenet")
    paths = make_set(folder, a.launch_shards, a.launch_per_shard)
    url = a.s3 + f"imagenet-{a.launch_shards}x{a.launch_per_shard}/"
    upload_folder(folder, url)
    shards.ensure_indexes(paths, want_meta=True)
    shards.open_shards(url)  # indexes and records of the bucket's shards into the cache, once
    env = {**os.environ, "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
           "HVDTRAIN_SHARD_CACHE": os.path.join(work, "launch-shards")}
    runs = {"local": [], "bucket": []}
    for _ in range(a.repeats):
        runs["local"].append(launch(folder, 1, work, env)["first_step_s"])
        runs["bucket"].append(launch(url, 1, work, env)["first_step_s"])
    med = {k: statistics.median(v) for k, v in runs.items()}
    return {"shards": a.launch_shards, "samples": a.launch_shards * a.launch_per_shard, "runs_s": runs,
            "median_s": med, "ratio": med["bucket"] / med["local"]}


def run(a) -> dict:
    work = a.work or tempfile.mkdtemp(prefix="bench-remote-")
    os.environ.setdefault("HVDTRAIN_CACHE", os.path.join(work, "cache"))
    jpegs = os.path.join(work, "jpeg")
    if not os.path.isdir(jpegs):
        from hvdtrain.bench.loader_runs import make_imagenet_like

        print(f"bench.remote: making {a.images} 500x375 JPEGs in {jpegs} ...", flush=True)
        make_imagenet_like(jpegs, a.images, 0, shard_size=a.shard_size)
    set_bytes = sum(os.path.getsize(os.path.join(jpegs, f)) for f in os.listdir(jpegs) if f.endswith(".tar"))
    half, most = set_bytes / 2 / 1e9, set_bytes * 0.75 / 1e9  # caches smaller than the set
    epoch = a.images // a.batch_size  # warm-up batches: one epoch, the fetcher in its steady state (cold line: 4)
    res: dict = {"set": {"images": a.images, "bytes": set_bytes, "shards": len([f for f in os.listdir(jpegs)
                                                                              if f.endswith(".tar")])}}
    buckets = {"s3": a.s3, "gs": a.gs}
    for scheme, prefix in buckets.items():
        if prefix:
            upload_folder(jpegs, prefix + "jpeg/")
    skip = set(a.skip.split(",")) if a.skip else set()
    sections = {
        "loader": lambda: {
            **alternated(a.rounds, local=lambda: loader_line(jpegs, a, most, window_shards=0, warmup=epoch),
                         s3_cache=lambda: loader_line(a.s3 + "jpeg/", a, most, "cache", a.server_log, warmup=epoch)),
            "s3_cache_cold": loader_line(a.s3 + "jpeg/", a, most, "cache", a.server_log),
            "local_windows": loader_line(jpegs, a, most, warmup=epoch),
            "s3_direct": loader_line(a.s3 + "jpeg/", a, most, "direct", a.server_log, windows=min(3, a.windows)),
            **({"gs_cache": loader_line(a.gs + "jpeg/", a, most, "cache", warmup=epoch)} if a.gs else {})},
        "epochs": lambda: {"small_cache": epochs_bytes(a.s3 + "jpeg/", half, 3, a.server_log),
                           "whole_cache": epochs_bytes(a.s3 + "jpeg/", 2 * set_bytes / 1e9, 2, a.server_log)},
        "launch": lambda: launches(a, work),
        "clients": lambda: {k: clients(p + "jpeg/", a.rounds) for k, p in buckets.items() if p},
    }
    from hvdtrain.bench.report import run_sections

    run_sections(sections, skip, res, after=lambda name: print(f"bench.remote: {name} done", flush=True))
    return res


def checks(res: dict) -> list[tuple[str, str, float | None, str]]:
    """(figure, target, measured, PASS/FAIL/NOT MEASURED)."""
    out = []

    def add(name, target, value, ok):
        out.append((name, target, value, "NOT MEASURED" if value is None else ("PASS" if ok(value) else "FAIL")))
    ld = res.get("loader", {})
    if ld.get("local", {}).get("img_s") and ld.get("s3_cache", {}).get("img_s"):
        r = ld["s3_cache"]["img_s"] / ld["local"]["img_s"]
        add("s3 through the cache vs local disk, img/s", ">= 0.9", r, lambda v: v >= 0.9)
    else:
        add("s3 through the cache vs local disk, img/s", ">= 0.9", None, None)
    steady = res.get("epochs", {}).get("small_cache", {}).get("epochs", [])[1:]
    g = (sum(e["gets"] for e in steady) / sum(e["samples"] for e in steady)
         if steady and all(e.get("gets") is not None for e in steady) else None)
    add("GETs per sample read through the cache (epochs 2..)", "<= 0.01", g, lambda v: v <= 0.01)
    lr = res.get("launch", {}).get("ratio")
    add("launch to first step, bucket vs local", "<= 1.2", lr, lambda v: v <= 1.2)
    ep = res.get("epochs", {})
    small = ep.get("small_cache", {}).get("epochs", [])
    worst = max((e["ratio"] for e in small[1:] if e["ratio"]), default=None)
    add("bytes fetched / read per epoch, cache of half the set (epochs 2..)", "<= 1.05", worst, lambda v: v <= 1.05)
    whole = ep.get("whole_cache", {}).get("epochs", [])
    add("bytes fetched in epoch 2, cache holds the set", "0", whole[1]["fetched_bytes"] if len(whole) > 1 else None,
        lambda v: v == 0)
    sc = ep.get("small_cache", {})
    over = (sc["max_held_bytes"] - sc["bound_bytes"]) / 1e6 if sc else None
    add("cache above its bound, MB (max sampled)", "<= 0 (<= one shard)", over, lambda v: v <= 0)
    return out


def table(res: dict) -> str:
    lines = [f"set: {res['set']['images']} JPEGs of 500x375 in {res['set']['shards']} shards, "
             f"{res['set']['bytes'] / 1e6:.0f} MB"]
    for k, r in res.get("loader", {}).items():
        img = f"{r['img_s']:.1f}" if r.get("img_s") else "-"
        srv = f", server {r['server_cores_used']:.2f} cores" if r.get("server_cores_used") is not None else ""
        lines.append(f"loader {k:<14} {img:>8} img/s   loader {r.get('cpu_cores_used') or 0:.2f} cores{srv}   "
                     f"GETs/sample {r['gets_per_sample']:.3f} ({r['gets']} GETs, {r['samples_read']} samples, "
                     f"{r['gets_from']}){'  ERROR ' + r['error'] if r.get('error') else ''}")
    for k, ep in res.get("epochs", {}).items():
        cells = ", ".join(f"{e['fetched_bytes'] / 1e6:.1f} MB / {e['read_bytes'] / 1e6:.1f} MB"
                          + (f" ({e['gets']} GETs)" if e.get("gets") is not None else "") for e in ep["epochs"])
        lines.append(f"epochs {k:<12} fetched / read per epoch: {cells}; cache max {ep['max_held_bytes'] / 1e6:.1f} "
                     f"MB of bound {ep['bound_bytes'] / 1e6:.1f} MB (set {ep['set_bytes'] / 1e6:.1f} MB)")
    if "launch" in res:
        la = res["launch"]
        lines.append(f"launch {la['shards']} shards, {la['samples']} samples: local {la['median_s']['local']:.2f} s, "
                     f"bucket {la['median_s']['bucket']:.2f} s (medians of {len(la['runs_s']['local'])})")
    for k, c in res.get("clients", {}).items():
        for name, r in c.items():
            if isinstance(r, dict):
                lines.append(f"client {k} {name:<42} " + (
                    f"{r['s']:.2f} s, {r['mb_s']:.0f} MB/s (median of {len(r['rounds_s'])}: "
                    + " ".join(f"{t:.2f}" for t in r["rounds_s"]) + " s)" if "s" in r else r["skipped"]))
    lines.append("")
    lines.append(f"{'figure':<66} {'target':>18} {'measured':>10}  result")
    for name, target, value, verdict in checks(res):
        v = "-" if value is None else f"{value:.3g}"
        lines.append(f"{name:<66} {target:>18} {v:>10}  {verdict}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.remote", description=__doc__.split("\n\n")[0])
    p.add_argument("--s3", required=True, help="a prefix this bench may write to: s3://bucket/prefix/")
    p.add_argument("--gs", default="", help="the same for GCS (optional): gs://bucket/prefix/")
    p.add_argument("--server-log", default="", help="the S3 server's request log, to count GETs (loopback servers)")
    p.add_argument("--images", type=int, default=8192)
    p.add_argument("--shard-size", type=int, default=256, help="JPEGs per shard (26 MB): 2 GETs of 16 MiB each")
    p.add_argument("--threads", type=int, default=2, help="DALI threads")
    p.add_argument("--window-shards", type=int, default=8, help="reader windows, shards (training's default)")
    p.add_argument("--windows", type=int, default=10, help="timed windows of 8 batches per loader line")
    p.add_argument("--batch-size", type=int, default=64, help="the loader lines' batch")
    p.add_argument("--rounds", type=int, default=3,
                   help="rounds of the alternated lines: local against s3 through the cache, and the clients")
    p.add_argument("--launch-shards", type=int, default=1024)
    p.add_argument("--launch-per-shard", type=int, default=1251)
    p.add_argument("--repeats", type=int, default=3, help="launches of each kind, alternated")
    p.add_argument("--skip", default="", help="sections to leave out: loader,epochs,launch,clients")
    p.add_argument("--work", default="", help="where the sets are made (kept: a second run reuses them)")
    p.add_argument("--run-dir", default="")
    a = p.parse_args(argv)
    for x in ("s3", "gs"):
        if getattr(a, x) and not getattr(a, x).endswith("/"):
            setattr(a, x, getattr(a, x) + "/")
    res = run(a)
    text = table(res)
    print("\n" + text)
    error = "; ".join(f"{k}: {v}" for k, v in res.get("errors", {}).items()) or None
    from hvdtrain.bench import report  # torch: only where the report is written

    result = report.envelope("remote", {k: v for k, v in vars(a).items()}, error, results=res,
                             checks=[dict(zip(("figure", "target", "measured", "result"), c)) for c in checks(res)])
    report.publish(a.run_dir, "remote", result, text)
    return 1 if error else 0


if __name__ == "__main__":
    sys.exit(main())
