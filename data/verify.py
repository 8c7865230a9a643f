"""Check shards before (or instead of) finding out mid-training: every problem in one pass.

    python -m data.verify shards/train [--val shards/val] [--no-decode] [--json report.json]

Per shard: the tar reads to its end (truncated tars), the `.idx` exists and matches the
tar (stale indexes), the counts and sha256 match `_info.json` (the data fingerprint).
Per sample: it has an image (any extension of `data.wds.IMAGE_EXTS`, any case) and a
`.cls`, the label is a decimal class index in range, and the image decodes (PIL; the
same files DALI rejects). Train and val must name the same classes. Exit 0 clean, 1
problems found, 2 bad usage.

Shards are checked in parallel (`--workers`, default every core), and each shard's
result is kept in the cache (`data.cache`) by the shard's content: checking unchanged
shards again reads only their headers. The same checks serve training: `locate_indexed()`
names the bad samples in a rank's view when DALI stops, and `--data.on_error=skip`
(`data.dataset.skip_bad`) leaves out the samples these records list.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from hvdtrain.data import cache, pool
from hvdtrain.data.files import write_atomic
from hvdtrain.data.nodecache import local_copy
from hvdtrain.data.shards import ShardSet, locate_index, resolve_shards
from hvdtrain.data.tarindex import ShardError, index_problem, read_index, split_name, walk
from hvdtrain.data.wds import IMAGE_EXTS, INFO_NAME, LABEL_EXT, LABEL_WIDTH, file_sha256, index_path_for, is_image_ext


@dataclass
class Problem:
    where: str          # shard path (and member), or a file
    what: str           # what is wrong and, where useful, what to do
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.where}{': ' + self.key if self.key else ''}: {self.what}"


@dataclass
class Report:
    splits: dict = field(default_factory=dict)     # split -> {"spec", "shards", "samples", "bad"}
    problems: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


# ---------------------------------------------------------------- single samples
def check_image(data: bytes) -> str | None:
    """None if the bytes decode as an image, else why not."""
    from PIL import Image

    if not data:
        return "zero-byte image"
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # noqa: BLE001 - PIL raises many types; every one means "cannot decode"
        return f"undecodable image ({e.__class__.__name__}: {e})"
    return None


def check_label(raw: bytes, num_classes: int | None) -> str | None:
    text = raw.strip()
    if not text.isdigit() or len(raw) >= LABEL_WIDTH:
        return f"label {raw[:20]!r} is not a decimal class index"
    if num_classes is not None and int(text) >= num_classes:
        return f"label {int(text)} out of range [0, {num_classes})"
    return None


def check_sample(comps: dict[str, bytes], num_classes: int | None, decode: bool = True,
                 labels_optional: bool = False) -> str | None:
    images = [e for e in comps if is_image_ext(e)]
    if not images:
        return f"no image member (has {sorted(comps) or 'nothing'}); the reader reads {', '.join(IMAGE_EXTS)}"
    label = next((e for e in comps if e.lower() == LABEL_EXT), None)
    if label is None:
        return None if labels_optional else "no .cls label member"
    return check_label(comps[label], num_classes) or (check_image(comps[images[0]]) if decode else None)


# ---------------------------------------------------------------- shards
RECORD_VERSION = 2  # 2: problems kept without the tar's path (a copy elsewhere reuses them)


def _record_path(tar: str, num_classes: int | None, decode: bool, labels_optional: bool = False) -> str:
    u = "-u" if labels_optional else ""
    return cache.path("verify", f"{cache.signature(tar)}-{num_classes or 0}-{int(decode)}{u}.json")


def cached_record(tar: str, num_classes: int | None, decode: bool = True, labels_optional: bool = False) -> dict | None:
    """A kept `shard_record` of this tar's content, or None (a decoded record serves an
    undecoded question too)."""
    for d in ((True, False) if not decode else (True,)):
        rec = cache.read_json(_record_path(tar, num_classes, d, labels_optional))
        if rec and rec.get("v") == RECORD_VERSION:
            return rec
    return None


def shard_record(tar: str, num_classes: int | None, decode: bool = True, labels_optional: bool = False) -> dict:
    """Every sample of one tar checked, from the tar alone (a header walk, then each
    sample's bytes): {samples, bad: [sample positions], skipped: [[key, what is wrong]],
    problems: [tar-level problems], complete: the tar reads to its end}. Kept in the cache
    by the tar's content (a tar in a bucket: by its ETag/generation, read from the node's
    cache), so unchanged shards are not decoded again."""
    with local_copy(tar) as path:
        rec = _record_of(path, num_classes, decode, labels_optional)
    cache.write_json(_record_path(tar, num_classes, decode, labels_optional), rec)
    return rec


def _record_of(tar: str, num_classes: int | None, decode: bool, labels_optional: bool) -> dict:
    size = os.path.getsize(tar)
    w = walk(tar, read_exts=(), tolerant=True)
    problems, bad, skipped = [], [], []
    complete = not w.error and size >= w.end + 1024 and size % 512 == 0
    if not complete:  # a whole tar ends with two zero blocks after its last member
        problems.append(f"truncated tar: {size} bytes, it ends inside or right after sample "
                        f"{len(w.samples)} ({w.error or 'no end-of-archive marker'}); re-copy or "
                        f"rebuild it")
    with open(tar, "rb") as f:
        for j, comps in enumerate(w.samples):
            key = split_name(comps[0][3])[0]
            members = {e: os.pread(f.fileno(), n, o) for e, o, n, _ in comps}
            why = check_sample(members, num_classes, decode, labels_optional)
            if why:
                bad.append(j)
                skipped.append([key, why])
    rec = {"v": RECORD_VERSION, "samples": len(w.samples), "bad": bad, "skipped": skipped, "problems": problems,
           "complete": complete, "decode": decode}
    return rec


def _record_job(job: tuple[str, int | None, bool]) -> tuple[dict, bool]:
    tar, num_classes, decode = job
    rec = cached_record(tar, num_classes, decode)
    return (rec, True) if rec is not None else (shard_record(tar, num_classes, decode), False)


def index_problems(tar: str, index_dir: str = "", rec: dict | None = None) -> list[Problem]:
    """The index this tar would be read with (`data.shards.locate_index`): missing, stale.
    With the tar's kept record `rec`: an index already found to describe this content, and
    unchanged since (path, size, mtime), is not read again."""
    idx, place, exists = locate_index(tar, index_dir)
    if not exists:
        return [Problem(index_path_for(tar), "missing DALI index; training builds it, or run "
                                             f"`python -m data.make_shards --index-only {os.path.dirname(tar) or '.'}`")]
    st = os.stat(idx)
    seen = f"{os.path.abspath(idx)}:{st.st_size}:{st.st_mtime_ns}"
    if rec is not None and seen in rec.get("index_ok", []):
        return []
    try:
        why = index_problem(tar, idx)
        if why is None and read_index(idx) != walk(tar, read_exts=(), tolerant=True).samples:
            why = f"it does not list the samples of {os.path.basename(tar)}"
    except (ShardError, ValueError, IndexError) as e:
        return [Problem(idx, f"unreadable index ({e})")]
    if why:
        return [Problem(idx, f"stale index ({place}): {why} (rebuild with `python -m data.make_shards --index-only`)")]
    if rec is not None:
        rec["index_ok"] = (rec.get("index_ok", []) + [seen])[-4:]
        rec["_dirty"] = True
    return []


def remote_index_problems(tar: str, index_dir: str, beside: dict | None, rec: dict, options) -> list[Problem]:
    """A tar in a bucket: the indexes training could use (`--index-dir`, the cache, the
    `.idx` object beside it) must list the samples of the tar's bytes; the answer is kept
    in the tar's record, so an unchanged pair is not read again. No index at all is no
    problem: training builds one from the bytes as the shard streams in."""
    from hvdtrain.data import remote
    from hvdtrain.data.remote import Obj

    name = tar.rsplit("/", 1)[-1][:-4] + ".idx"
    local = [p for p in ([os.path.join(index_dir, name)] if index_dir else []) +
             [cache.path("indexes", f"{cache.signature(tar)}.idx")] if os.path.exists(p)][:1]
    keys = {p: f"{os.path.abspath(p)}:{os.stat(p).st_size}:{os.stat(p).st_mtime_ns}" for p in local}
    obj = Obj(**beside) if beside else None
    if obj is not None:
        keys[obj.url] = f"{obj.url}:{obj.size}:{obj.etag}"
    todo = [k for k, v in keys.items() if v not in rec.get("index_ok", [])]
    if not todo:
        return []
    out = []
    with local_copy(tar, options) as path:
        samples = walk(path, read_exts=(), tolerant=True).samples
        for k in todo:
            try:
                if k == (obj.url if obj else None):
                    tmp = cache.path("jobs", f"verify-{os.getpid()}-{obj.sig}.idx")
                    with open(tmp, "wb") as f:
                        f.write(remote.store_for(obj.url).get_bytes(obj))
                    try:
                        ok = read_index(tmp) == samples
                    finally:
                        os.remove(tmp)
                    why = (f"stale index in the bucket: it does not list the samples of {tar} (training ignores it "
                           f"and indexes the shard's bytes; rebuild it with `python -m data.make_shards --index-only "
                           f"{tar.rsplit('/', 1)[0]}/`)")
                else:
                    ok, why = read_index(k) == samples, f"stale index: it does not list the samples of {tar}"
            except (ShardError, ValueError, IndexError) as e:
                ok, why = False, f"unreadable index ({e})"
            if ok:
                rec["index_ok"] = (rec.get("index_ok", []) + [keys[k]])[-4:]
                rec["_dirty"] = True
            else:
                out.append(Problem(k, why))
    return out


def _shard_job(job: tuple) -> dict:
    """Pool work for one shard: its record (kept, or made: every sample decoded), its index
    checked, its sha256 (kept) when `_info.json` has one to compare. A tar in a bucket
    comes with its listing (object, `.idx` object beside, node cache options) and is read
    from its copy in the node's cache, only when its kept record does not answer."""
    from hvdtrain.data import nodecache, remote

    tar, num_classes, decode, index_dir, want_sha = job[:5]
    listing = job[5] if len(job) > 5 else None
    options = None
    if listing is not None:
        remote.remember([remote.Obj(**listing["obj"])])
        options = nodecache.Options(**listing["options"])
        nodecache.get(options)  # this process's bucket reads use the run's cache folder
    rec, was_cached = _record_job((tar, num_classes, decode))
    problems = [Problem(tar, x) for x in rec["problems"]]
    problems += (remote_index_problems(tar, index_dir, listing.get("idx"), rec, options) if listing
                 else index_problems(tar, index_dir, rec))
    problems += [Problem(tar, what, key) for key, what in rec["skipped"]]
    if want_sha and not rec.get("sha256"):
        with local_copy(tar, options) as path:
            rec["sha256"], rec["_dirty"] = file_sha256(path), True
    if rec.pop("_dirty", False):
        cache.write_json(_record_path(tar, num_classes, rec.get("decode", decode)), rec)
    return {"samples": rec["samples"], "problems": problems, "cached": was_cached, "sha256": rec.get("sha256")}


def check_shard(tar: str, num_classes: int | None, decode: bool = True, index_dir: str = "") -> tuple[int, list[Problem]]:
    """(samples in the tar, problems) for one shard: tar, index, every sample."""
    out = _shard_job((tar, num_classes, decode, index_dir, False))
    return out["samples"], out["problems"]


def _listing(spec: str, options) -> tuple[list[str], str | None, dict | None, list]:
    """(tar paths, _info.json path or URL, its content, per-tar extra job items) of a split."""
    from hvdtrain.data import remote

    if not remote.is_remote(spec):
        paths = resolve_shards(spec)
        info_path = os.path.join(os.path.dirname(os.path.abspath(paths[0])), INFO_NAME)
        info = json.load(open(info_path)) if os.path.exists(info_path) else None
        return paths, info_path, info, [() for _ in paths]
    from hvdtrain.data import nodecache
    from hvdtrain.data.bucket import read_info

    tars, beside = remote.resolve(spec)
    found = read_info(tars, beside)
    opts = dataclasses.asdict(options or nodecache.Options())
    nodecache.get(options or nodecache.Options()).want("verify", tars)  # the fetcher streams them in order
    extra = [({"obj": t.to_dict(), "options": opts,
               "idx": beside[t.name[:-4] + ".idx"].to_dict() if t.name[:-4] + ".idx" in beside else None},)
             for t in tars]
    return [t.url for t in tars], found[0] if found else None, found[1] if found else None, extra


def verify_split(spec: str, decode: bool = True, num_classes: int | None = None, workers: int | None = None,
                 index_dir: str = "", options=None) -> tuple[dict, list[Problem]]:
    try:
        paths, info_path, info, extra = _listing(spec, options)
    except ShardError as e:
        return {"spec": spec, "shards": 0, "samples": 0, "bad": 0}, [Problem(spec, str(e))]
    num_classes = (info.get("num_classes") if info else None) or num_classes
    problems: list[Problem] = []
    by_name = {s["name"]: s for s in info.get("shards", [])} if info else {}
    jobs = [(t, num_classes, decode, index_dir, bool(by_name.get(os.path.basename(t), {}).get("sha256"))) + x
            for t, x in zip(paths, extra)]
    total = reused = 0
    for tar, out in zip(paths, pool.imap(_shard_job, jobs, workers)):
        n = out["samples"]
        reused += out["cached"]
        total += n
        problems += out["problems"]
        entry = by_name.get(os.path.basename(tar))
        if entry is not None and entry.get("samples") != n:
            problems.append(Problem(tar, f"holds {n} samples but {info_path} says {entry['samples']}"))
        if entry is not None and entry.get("sha256") and entry["sha256"] != out["sha256"]:
            problems.append(Problem(tar, f"content differs from the sha256 in {info_path}: the shard changed "
                                         "after it was written, so the data fingerprint no longer describes it"))
    bad = sum(1 for p in problems if p.key)
    summary = {"spec": spec, "shards": len(paths), "samples": total, "bad": bad, "num_classes": num_classes,
               "classes": info.get("classes") if info else None, "info": info_path if info else None,
               "records_reused": reused}
    return summary, problems


def verify(train: str, val: str | None = None, decode: bool = True, num_classes: int | None = None,
           workers: int | None = None, index_dir: str = "", options=None) -> Report:
    rep = Report()
    for split, spec in (("train", train), ("val", val)):
        if spec:
            rep.splits[split], found = verify_split(spec, decode, num_classes, workers, index_dir, options)
            rep.problems += found
    t, v = rep.splits.get("train", {}), rep.splits.get("val")
    if v and t.get("classes") and v.get("classes") and t["classes"] != v["classes"]:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(t["classes"], v["classes"])) if a != b]
        rep.problems.append(Problem(f"{val}", f"val classes differ from train's ({len(t['classes'])} vs "
                                              f"{len(v['classes'])}; first differences {diff[:3]})"))
    return rep


# ---------------------------------------------------------------- for training
def locate_indexed(shards: ShardSet, num_classes: int | None, budget_s: float = 60.0) -> tuple[list[Problem], bool]:
    """Bad samples among those a shard set's indexes list (one rank's view of the data:
    data.dataset.rank_view), for the message when DALI stops: each listed sample is read
    at its offsets and checked, and each tar once for truncation. (problems, complete):
    gives up after `budget_s`."""
    t0, found, seen = time.monotonic(), [], set()
    for tar, idx in zip(shards.paths, shards.index_paths):
        size = os.path.getsize(tar)
        if tar not in seen:
            seen.add(tar)
            w = walk(tar, read_exts=(), tolerant=True)
            if w.error:
                found.append(Problem(tar, f"truncated or damaged tar after {len(w.samples)} samples ({w.error})"))
        with open(tar, "rb") as f:
            for comps in read_index(idx):
                key = split_name(comps[0][3])[0] if comps else "?"
                if any(o + n > size for _, o, n, _ in comps):
                    why = "cut off by the end of a truncated tar"
                else:
                    why = check_sample({split_name(name)[1]: os.pread(f.fileno(), n, off)
                                        for _, off, n, name in comps}, num_classes)
                if why and all(p.key != key or p.where != tar for p in found):
                    found.append(Problem(tar, why, key))
                if time.monotonic() - t0 > budget_s:
                    return found, False
    return found, True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("train", help="shard folder, .tar, brace pattern or glob")
    p.add_argument("--val", help="validation shards: checked too, and their classes against train's")
    p.add_argument("--no-decode", action="store_true", help="skip decoding images (structure and labels only)")
    p.add_argument("--num-classes", type=int, help="label range for shards without _info.json")
    p.add_argument("--json", help="also write the report here")
    p.add_argument("--workers", type=int, default=0, help="processes checking shards (default: every core)")
    p.add_argument("--index-dir", default="", help="where indexes are kept if not beside the tars "
                                                   "(training's --data.index_dir)")
    p.add_argument("--cache-dir", default="", help="bucket data: the node's shard cache (training's --data.cache_dir)")
    p.add_argument("--cache-gb", type=float, default=0.0, help="bucket data: its bound, GB (training's --data.cache_gb)")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    from hvdtrain.data import nodecache

    opts = nodecache.Options(cache_dir=a.cache_dir, cache_gb=a.cache_gb)
    try:
        rep = verify(a.train, a.val, decode=not a.no_decode, num_classes=a.num_classes, workers=a.workers or None,
                     index_dir=a.index_dir, options=opts)
    finally:
        nodecache.close_all()
    for split, s in rep.splits.items():
        kept = f", {s['records_reused']} unchanged shard(s) not read again" if s.get("records_reused") else ""
        print(f"{split}: {s['spec']}: {s['shards']} shard(s), {s['samples']} samples, {s['bad']} bad sample(s){kept}")
    for prob in rep.problems:
        print(f"  {prob}")
    print(f"{len(rep.problems)} problem(s) in {time.perf_counter() - t0:.1f} s" if rep.problems
          else f"OK ({time.perf_counter() - t0:.1f} s)")
    if a.json:
        write_atomic(a.json, json.dumps({"splits": rep.splits, "problems": [asdict(x) for x in rep.problems]},
                                        indent=1))
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
