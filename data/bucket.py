"""Opening shards in a bucket: the same `ShardSet` a local folder gives, with URLs for
paths and local index files.

    shards = open_shards("s3://bucket/imagenet/train/")      # data.shards dispatches here

Indexes come, in order, from `--data.index_dir` (`<shard>.idx`), the index cache
(`$HVDTRAIN_CACHE`, keyed by bucket, key, size and ETag/generation), or the `.idx` object
beside the shard when it fits the shard (checked with a few ranged reads of the tar
headers, once: the checked copy goes into the cache). A shard with none is streamed
into the node's shard cache (`data.nodecache`: the same fetcher, retries and bound the
reader uses) and indexed from the local copy by the header walk: never a header walk
over the network. Shards without `_info.json` also get their per-shard label records
from that walk. One process per node builds what is missing (the lock the local index
builder uses); the others wait and read the results.
"""
from __future__ import annotations

import hashlib
import json
import os
import time

from hvdtrain.data import cache, nodecache, remote
from hvdtrain.data.records import META_VERSION, quick_fingerprint, shard_meta
from hvdtrain.data.store import Obj, RemoteError, retrying
from hvdtrain.data.files import write_atomic
from hvdtrain.data.tarindex import ShardError, index_problem, index_text, read_index_count, walk
from hvdtrain.data.wds import INFO_FORMAT, INFO_NAME, LABEL_EXT

READ_AHEAD = 64 << 10


class RangeFile:
    """Seek/read over a remote object, each read a ranged GET of at least 64 KiB."""

    def __init__(self, obj: Obj):
        self.obj, self.pos, self._buf, self._at = obj, 0, b"", -1

    def seek(self, pos: int) -> None:
        self.pos = pos

    def read(self, n: int) -> bytes:
        if not (self._at <= self.pos and self.pos + n <= self._at + len(self._buf)):
            end = min(self.obj.size, self.pos + max(n, READ_AHEAD))
            got: dict[int, bytes] = {}
            store = remote.store_for(self.obj.url)
            if end > self.pos:
                start = self.pos
                retrying(store, lambda: store.read(self.obj, start + sum(map(len, got.values())), end,
                                                   lambda off, b: got.__setitem__(off, b)),
                                self.obj.url, "GET", progress=lambda: sum(map(len, got.values())))
            self._buf, self._at = b"".join(got[k] for k in sorted(got)), self.pos
        a = self.pos - self._at
        self.pos += n
        return self._buf[a:a + n]

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        pass


def _index_from_bucket(tar: Obj, idx: Obj, out: str) -> str | None:
    """Copy the bucket's `.idx` into `out` if it describes `tar`; else the reason not."""
    data = remote.store_for(idx.url).get_bytes(idx)
    tmp = f"{out}.check{os.getpid()}"
    write_atomic(tmp, data)
    try:
        why = index_problem(tar.url, tmp, opened=(RangeFile(tar), tar.size))
        if why is None:
            os.replace(tmp, out)
        return why
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def _plan(tars: list[Obj], beside: dict[str, Obj], index_dir: str, want_meta: bool, log):
    """(index paths, objects to stream, where each index is): indexes found now, and the
    shards that need a walk of their bytes (no usable index, or no label record)."""
    idx, stream, where = [], [], []
    for t in tars:
        name = t.name[:-4] + ".idx"
        cached = cache.path("indexes", f"{t.sig}.idx")
        meta = cache.path("shards", f"{t.sig}.json")
        have_meta = not want_meta or (cache.read_json(meta) or {}).get("v") == META_VERSION
        place = None
        if index_dir and os.path.exists(os.path.join(index_dir, name)):
            p, place = os.path.join(index_dir, name), "index_dir"
        elif os.path.exists(cached):
            cache.used(cached)
            p, place = cached, "cache"
        elif name in beside and have_meta:
            why = _index_from_bucket(t, beside[name], cached)
            if why is None:
                p, place = cached, "bucket"
            elif log:
                log(f"data: {beside[name].url} does not fit its shard ({why}): indexing the shard's bytes instead")
        if place is None or not have_meta:
            stream.append(t)
            p, place = cached, "built"
        idx.append(p)
        where.append(place)
    return idx, stream, where


def _walk_streamed(objs: list[Obj], options: nodecache.Options, log) -> None:
    """Stream `objs` into the node's cache (the fetcher's parallel ranged GETs) and index
    each local copy as it arrives: the `.idx` and the per-shard label record, in the cache."""
    nc = nodecache.get(options, log)
    nc.want("index", objs)
    t0, nbytes = time.monotonic(), 0
    try:
        for i, o in enumerate(objs):
            nc.want("index", objs[i:])
            path = nc.fetch("index", [o])[0]
            try:
                w = walk(path, read_exts=(LABEL_EXT,))
                if not w.samples:
                    raise ShardError(f"{o.url}: no samples in this tar")
                idx = cache.path("indexes", f"{o.sig}.idx")
                if not os.path.exists(idx):
                    write_atomic(idx, index_text(w.samples).encode("utf-8", "surrogateescape"))
                rec = shard_meta(w, idx)
                assert rec["v"] == META_VERSION
                cache.write_json(cache.path("shards", f"{o.sig}.json"), rec)
            except ShardError as e:
                raise ShardError(str(e).replace(path, o.url)) from None
            finally:
                nc.release("index", [o])
            nbytes += o.size
            if log and (i + 1 == len(objs) or (i + 1) % 100 == 0):
                dt = time.monotonic() - t0
                log(f"data: indexed {i + 1}/{len(objs)} shard(s) from the bucket, {nbytes / 1e6:.0f} MB in {dt:.1f} s "
                    f"({nbytes / 1e6 / max(dt, 1e-9):.0f} MB/s)")
    finally:
        nc.close_channel("index")


def read_info(tars: list[Obj], beside: dict[str, Obj]) -> tuple[str, dict] | None:
    folders = {t.url.rsplit("/", 1)[0] for t in tars}
    if len(folders) != 1 or INFO_NAME not in beside:
        return None
    o = beside[INFO_NAME]
    try:
        data = json.loads(remote.store_for(o.url).get_bytes(o))
    except ValueError:
        return None
    return (o.url, data) if data.get("format") == INFO_FORMAT else None


def open_remote(spec: str, index_dir: str = "", options: nodecache.Options | None = None, log=None) -> dict:
    """The fields of a bucket spec's `data.shards.ShardSet` (see the module docstring)."""
    options = options or nodecache.Options()
    tars, beside = remote.resolve(spec)
    info = read_info(tars, beside)
    by_name = {s["name"]: s for s in info[1].get("shards", [])} if info else {}
    whole = bool(by_name) and len(by_name) == len(tars) and all(t.name in by_name for t in tars)
    idx, stream, where = _plan(tars, beside, index_dir, not whole, log)
    if stream:
        key = hashlib.sha256("\n".join(t.sig for t in tars).encode()).hexdigest()[:16]
        with cache.lock(f"index-{key}", log, f"indexing {len(stream)} shard(s) from the bucket"):
            # another process may have built some while this one waited: plan those again
            again, stream2, where2 = _plan(stream, beside, index_dir, not whole, log)
            if stream2:
                _walk_streamed(stream2, options, log)
        at = {t.sig: i for i, t in enumerate(tars)}
        for t, p, w in zip(stream, again, where2):
            idx[at[t.sig]], where[at[t.sig]] = p, w
    metas = [cache.read_json(cache.path("shards", f"{t.sig}.json")) for t in tars] if not whole else None
    counts = [m["samples"] for m in metas] if metas else [read_index_count(i) for i in idx]
    urls = [t.url for t in tars]
    classes = num_classes = None
    shuffled, info_url = None, None
    if info is not None:
        info_url, data = info
        for t, n in zip(tars, counts):
            s = by_name.get(t.name)
            if s is not None and s["samples"] != n:
                raise ShardError(f"{t.url}: index has {n} samples but {info_url} says {s['samples']}: stale index "
                                 f"or shard")
        classes, num_classes, shuffled = data.get("classes"), data.get("num_classes"), bool(data.get("shuffled"))
        fingerprint = data["fingerprint"] if whole else quick_fingerprint(urls, metas, [t.size for t in tars])
    else:
        fingerprint = quick_fingerprint(urls, metas, [t.size for t in tars])
    unlabeled = sum(m["unlabeled"] for m in metas) if metas and info is None else 0
    places = {w: where.count(w) for w in sorted(set(where))}
    return dict(spec=spec, paths=urls, index_paths=idx, counts=counts, num_classes=num_classes, classes=classes,
                fingerprint=fingerprint, info_path=info_url, shuffled=shuffled, meta=metas, where=places,
                unlabeled=unlabeled, objects={t.url: t for t in tars}, remote=options)


def describe_source(spec: str) -> str:
    """Where a bucket's data comes from, for the banner: endpoint and credential source."""
    try:
        return remote.store_for(spec).credential_source()
    except RemoteError as e:
        return str(e)
