"""Opening shards: paths, their DALI indexes (found or built), `_info.json`, classes and
the data fingerprint. Training, `data.verify` and `data.make_shards --index-only` all find
indexes here, the same way:

1. `--data.index_dir` / `--index-dir DIR`, if given: `DIR/<shard>.idx`;
2. beside the tar: `<shard>.idx`;
3. the cache (`data.cache`): `indexes/<signature>.idx`, for tars in folders nobody can write.

An index is checked against its tar by content (`tarindex.index_problem`: what a copy
keeps), not by mtime. A missing one is built where the first of those places is writable
(the index folder, else beside the tar, else the cache). On a node one process builds
what is missing, with every core it may use, while the others wait for it (a lock in
the cache). Shards from other tools (no `_info.json`) also get a per-shard record in the
cache from the same header walk: sample and label counts, the label range, and the
first sample without a label or without an image, so a run can size its classifier and
refuse a wrong task before any DALI pipeline is built, without reading every index line.
"""
from __future__ import annotations

import glob
import hashlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

from hvdtrain.data import cache
from hvdtrain.data.files import write_atomic
from hvdtrain.data.records import META_VERSION, expand_braces, quick_fingerprint, shard_meta
from hvdtrain.data.tarindex import (ShardError, compressed_error, compression_of_name, index_problem, index_text,
                                    read_index_count, walk)
from hvdtrain.data.wds import INFO_FORMAT, INFO_NAME, LABEL_EXT, index_path_for



def resolve_shards(spec: str) -> list[str]:
    """A directory (its *.tar, sorted), a .tar, a brace pattern or a glob -> tar paths.

    Every path returned exists and is a plain tar by name; an empty result, a missing
    file or a compressed shard is an error that names what was asked for."""
    if not spec:
        raise ShardError("no shard path given (set --data.train=PATH)")
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not paths:
            packed = sorted(p for p in glob.glob(os.path.join(spec, "*")) if compression_of_name(p))
            if packed:
                raise compressed_error(packed[0], compression_of_name(packed[0]),
                                       f" ({len(packed)} compressed shard(s) in {spec}, no .tar)")
            raise ShardError(f"{spec}: directory holds no .tar shards")
        return paths
    paths = []
    for p in expand_braces(spec):
        paths.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
    for p in paths:
        kind = compression_of_name(p)
        if kind:
            raise compressed_error(p, kind)
    missing = [p for p in paths if not os.path.isfile(p)]
    if missing:
        more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
        raise ShardError(f"{spec}: {len(missing)} of {len(paths)} shard(s) missing: "
                         f"{', '.join(missing[:3])}{more}")
    if not paths:
        raise ShardError(f"{spec}: pattern matches no shard")
    return paths


@dataclass
class ShardSet:
    """What a run reads: tar paths, their indexes, counts, classes and fingerprint."""
    spec: str
    paths: list[str]
    index_paths: list[str]
    counts: list[int]
    num_classes: int | None
    classes: list[str] | None
    fingerprint: str
    info_path: str | None
    shuffled: bool | None = None  # _info.json says the samples were written in random order
    meta: list[dict] | None = None  # per-shard records (shards without _info.json): labels, members
    where: dict = field(default_factory=dict)  # indexes found or built, by place
    unlabeled: int = 0  # samples without a `.cls` member (the per-shard records say; 0 with _info.json)
    objects: dict | None = None  # bucket data: url -> data.remote.Obj as listed (size, ETag/generation)
    remote: object = None        # bucket data: data.nodecache.Options (how the node caches it)

    @property
    def is_remote(self) -> bool:
        return self.objects is not None

    @property
    def total(self) -> int:
        return sum(self.counts)

    def describe(self) -> dict:
        out = {"spec": self.spec, "shards": len(self.paths), "first": self.paths[0],
               "last": self.paths[-1], "samples": self.total, "num_classes": self.num_classes,
               "fingerprint": self.fingerprint, "info": self.info_path, "indexes": dict(self.where)}
        if self.is_remote:  # where the bytes come from: endpoint and credential source, never a secret
            from hvdtrain.data.remote import store_for

            out["store"] = store_for(self.spec).credential_source()
            out["remote"] = getattr(self.remote, "mode", "cache")
        return out


# ---------------------------------------------------------------- one shard
def build_one(job: tuple[str, str, bool, str | None]) -> tuple[str, int, dict | None]:
    """Pool work for one tar: (tar, where its index goes or lies, write it?, where its record
    goes or None) -> (tar, samples, record). One header walk serves both."""
    tar, idx, write, meta_path = job
    w = walk(tar, read_exts=(LABEL_EXT,) if meta_path else ())
    if not w.samples:
        raise ShardError(f"{tar}: no samples in this tar")
    if write:
        write_atomic(idx, index_text(w.samples).encode("utf-8", "surrogateescape"))
    rec = None
    if meta_path:
        listed = read_index_count(idx)
        if listed != len(w.samples):
            raise ShardError(f"{tar}: its index {idx} lists {listed} samples but the tar holds {len(w.samples)} "
                             f"(made by a tool that groups members otherwise?): delete it and hvdtrain builds "
                             f"one, or run `python -m data.make_shards --index-only {os.path.dirname(tar) or '.'}`")
        rec = shard_meta(w, idx)
        cache.write_json(meta_path, rec)
    return tar, len(w.samples), rec


# ---------------------------------------------------------------- finding and building indexes
def _writable(folder: str) -> bool:
    return os.access(folder or ".", os.W_OK)  # False on a read-only mount (EROFS), also for root


def locate_index(tar: str, index_dir: str = "") -> tuple[str, str, bool]:
    """(index path, place, exists) for one tar: the first of index_dir / beside / cache that
    holds it, else where it would be built."""
    name = os.path.basename(index_path_for(tar))
    places = ([("index_dir", os.path.join(index_dir, name))] if index_dir else []) + [("beside", index_path_for(tar))]
    for place, p in places:
        if os.path.exists(p):
            return p, place, True
    cached = cache.path("indexes", f"{cache.signature(tar)}.idx")
    if os.path.exists(cached):
        cache.used(cached)
        return cached, "cache", True
    if index_dir:
        if not _writable(index_dir):
            raise ShardError(f"{tar}: no index in --data.index_dir={index_dir}, and that folder is not writable")
        return places[0][1], "index_dir", False
    if _writable(os.path.dirname(tar)):
        return places[-1][1], "beside", False
    return cached, "cache", False


def _checked(tar: str, idx: str, place: str, check_fit: bool) -> bool:
    """True if the index describes its tar; False if it is older than the tar and does not
    (built again); a newer index that does not is refused, naming the rebuild command."""
    why = index_problem(tar, idx)
    if why is None:
        return True
    if place != "cache" and os.path.getmtime(idx) < os.path.getmtime(tar) and "truncated" not in why:
        return False  # the tar was written again after its index: an old index, rebuilt
    if not check_fit and "truncated" in why:
        return True   # --data.on_error=skip builds its own indexes from the tar itself
    if "truncated" in why:
        raise ShardError(f"{tar}: {why}; re-copy the shard, or check it with `python -m data.verify {tar}`")
    raise ShardError(f"{tar}: {why}; rebuild it with `python -m data.make_shards --index-only "
                     f"{os.path.dirname(tar) or '.'}`")


def ensure_indexes(paths: list[str], index_dir: str = "", want_meta: bool = False, check_fit: bool = True,
                   workers: int | None = None, log=None) -> tuple[list[str], list[dict] | None, dict]:
    """(index paths, per-shard records or None, {place: count}) for `paths`, building what is
    missing. One process per node builds (a lock in the cache keyed by the shard list)."""
    def plan():
        jobs, idx, where = [], [], {}
        for tar in paths:
            p, place, exists = locate_index(tar, index_dir)
            if exists and not _checked(tar, p, place, check_fit):
                p, place, exists = locate_index_for_rebuild(tar, index_dir, p, place)
            meta = cache.path("shards", f"{cache.signature(tar)}.json") if want_meta else None
            have_meta = meta is None or (cache.read_json(meta) or {}).get("v") == META_VERSION
            if not exists or not have_meta:
                jobs.append((tar, p, not exists, meta))
            idx.append(p)
            where[place] = where.get(place, 0) + 1
        return jobs, idx, where

    jobs, idx, where = plan()
    if jobs:
        key = hashlib.sha256("\n".join(os.path.abspath(p) for p in paths).encode()).hexdigest()[:16]
        with cache.lock(f"index-{key}", log, f"indexing {len(jobs)} shard(s)"):
            jobs, idx, where = plan()  # another process may have built them during the wait
            if jobs:
                run_jobs(jobs, workers, log)
                where["built"] = len(jobs)
    metas = None
    if want_meta:
        metas = [cache.read_json(cache.path("shards", f"{cache.signature(t)}.json")) for t in paths]
    return idx, metas, where


def locate_index_for_rebuild(tar: str, index_dir: str, old: str, place: str) -> tuple[str, str, bool]:
    """An old index (older than its tar) is rebuilt where it lies if that folder is writable,
    else in the cache."""
    if _writable(os.path.dirname(old)):
        return old, place, False
    return cache.path("indexes", f"{cache.signature(tar)}.idx"), "cache", False


def run_jobs(jobs: list, workers: int | None, log=None) -> None:
    """Index builds across processes. A process with threads (a training rank: torch,
    Horovod, DALI) runs them in a fresh `python -m data.shards` process: forking it is not
    safe (a forked pool hangs on a lock another thread held)."""
    from hvdtrain.data import pool

    workers = workers or pool.cores()
    if workers > 1 and len(jobs) > 1 and (threading.active_count() > 1 or "torch" in sys.modules):
        # torch's and DALI's own (native) threads do not show in threading: a fork would hang
        spec = cache.path("jobs", f"{os.getpid()}-{time.monotonic_ns()}.json")
        cache.write_json(spec, {"jobs": jobs})
        try:
            r = subprocess.run([sys.executable, "-m", "hvdtrain.data.shards", "build", spec, str(workers)],
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        finally:
            os.remove(spec)
        if r.returncode != 0:
            last = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else f"exit {r.returncode}"
            raise ShardError(last.removeprefix("shards: error: "))
        if log and r.stdout.strip():
            for line in r.stdout.strip().splitlines():
                log(line)
        return
    t0, done, samples = time.monotonic(), 0, 0
    for _, n, _ in pool.imap(build_one, jobs, workers):
        done, samples = done + 1, samples + n
        if log and (done == len(jobs) or pool.tick(t0)):
            rate = samples / max(time.monotonic() - t0, 1e-9)
            log(f"data: indexed {done}/{len(jobs)} shard(s), {samples} samples, {rate / 1e3:.1f} k samples/s "
                f"({time.monotonic() - t0:.1f} s)")


# ---------------------------------------------------------------- a split
def find_info(paths: list[str]) -> tuple[str, dict] | None:
    dirs = {os.path.dirname(os.path.abspath(p)) for p in paths}
    if len(dirs) != 1:
        return None
    path = os.path.join(dirs.pop(), INFO_NAME)
    if not os.path.exists(path):
        return None
    with open(path) as f:
        data = json.load(f)
    if data.get("format") != INFO_FORMAT:
        return None
    return path, data


def open_shards(spec: str, build_missing_index: bool = True, check_fit: bool = True, index_dir: str = "",
                workers: int | None = None, log=None, remote=None) -> ShardSet:
    """Resolve `spec`, find or build the index of each tar, read `_info.json` (or, for
    shards from other tools, the per-shard records). `check_fit=False` leaves truncated tars
    to the caller (`--data.on_error=skip` drops the samples they lost). A bucket URL
    (`s3://`, `gs://`) opens through `data.bucket`; `remote`: its data.nodecache.Options."""
    from hvdtrain.data import remote as R

    if R.is_remote(spec):
        from hvdtrain.data.bucket import open_remote

        return ShardSet(**open_remote(spec, index_dir, remote, log))
    R.refuse_credentials_in(spec, "--data")
    paths = resolve_shards(spec)
    info = find_info(paths)
    if not build_missing_index:
        for p in paths:
            _, place, exists = locate_index(p, index_dir)
            if not exists:
                raise ShardError(f"{p}: no DALI index; build it with `python -m data.make_shards --index-only "
                                 f"{os.path.dirname(p) or '.'}`")
    by_name = {s["name"]: s for s in info[1].get("shards", [])} if info is not None else {}
    whole = bool(by_name) and len(by_name) == len(paths) and all(os.path.basename(p) in by_name for p in paths)
    # per-shard records: for shards without _info.json, and for a subset of a split (its own fingerprint)
    index_paths, metas, where = ensure_indexes(paths, index_dir, not whole, check_fit, workers, log)
    counts = [m["samples"] for m in metas] if metas else [read_index_count(i) for i in index_paths]
    classes = num_classes = None
    if info is not None:
        info_path, data = info
        for p, n in zip(paths, counts):
            s = by_name.get(os.path.basename(p))
            if s is not None and s["samples"] != n:
                raise ShardError(f"{p}: index has {n} samples but {info_path} says {s['samples']}: "
                                 "stale index or shard; rebuild with data.make_shards")
        classes, num_classes = data.get("classes"), data.get("num_classes")
        fingerprint = data["fingerprint"] if whole else quick_fingerprint(paths, metas)
        shuffled = bool(data.get("shuffled"))
    else:
        info_path, fingerprint, shuffled = None, quick_fingerprint(paths, metas), None
    unlabeled = sum(m["unlabeled"] for m in metas) if metas and info is None else 0
    return ShardSet(spec, paths, index_paths, counts, num_classes, classes, fingerprint, info_path, shuffled,
                    metas, where, unlabeled)


def main(argv: list[str] | None = None) -> int:
    """`python -m data.shards build JOBS.json WORKERS`: the index builds of a training rank."""
    from hvdtrain.data import pool

    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 3 or argv[0] != "build":
        print("usage: python -m data.shards build JOBS.json WORKERS", file=sys.stderr)
        return 2
    jobs = [tuple(j) for j in cache.read_json(argv[1])["jobs"]]
    try:
        run_jobs(jobs, int(argv[2]), lambda s: print(s, flush=True))
    except ShardError as e:
        print(f"shards: error: {e}", flush=True)
        return 1
    return 0 if pool.cores() else 1


if __name__ == "__main__":
    sys.exit(main())
