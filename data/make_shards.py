"""Images on disk -> shuffled WebDataset shards with DALI indexes and `_info.json`.

    python -m data.make_shards SRC OUT [--layout auto|imagefolder|tinyimagenet] [--shard-size K] [--workers N]
    python -m data.make_shards --index-only DIR [--index-dir D]   # indexes for shards from other tools
    python -m data.make_shards SRC s3://bucket/prefix/             # shards uploaded as each is finished
    python -m data.make_shards --index-only s3://bucket/prefix/train/   # indexes built once, uploaded beside

Layouts (auto-detected):
  imagefolder   SRC/<class>/*.<any of data.wds.IMAGE_EXTS> in any letter case; if SRC/train (and
                SRC/val) exist, each is an ImageFolder split.
  tinyimagenet  SRC/wnids.txt, SRC/train/<wnid>/images/*.JPEG,
                SRC/val/images/*.JPEG with SRC/val/val_annotations.txt.
Class index = sorted class names (the wnids.txt order for Tiny-ImageNet); the mapping is
written to OUT/classes.txt and into each `_info.json`. Samples are shuffled before they
are written, because DALI reads the tars in order. Each image is stored as the format it
is (`.jpg`, `.png`, `.webp`, ...: data.wds.PIL_FORMATS, the one extension list the reader
and data.verify use); images that PIL cannot decode are rejected, listed and counted,
never written.

Shards are written whole, in parallel (`--workers`, default every core this process may
use), each in one pass (index and sha256 taken while the tar is written) under a
temporary name renamed when complete, with a record in `<split>/.parts/`. A killed build
run again keeps the finished shards and writes the rest; `_info.json` comes last.
"""
from __future__ import annotations

import argparse
import glob
import hashlib
import json
import os
import random
import sys
import time
from dataclasses import dataclass

from PIL import Image
from tqdm import tqdm

from hvdtrain.data import pool
from hvdtrain.data.shards import ensure_indexes, resolve_shards
from hvdtrain.data.files import write_atomic
from hvdtrain.data.tarindex import ShardError, read_index_count
from hvdtrain.data.wds import IMAGE_EXTS, PIL_FORMATS, Sample, index_path_for, shard_name, write_info, write_shard


@dataclass
class Item:
    path: str
    label: int


def detect_layout(src: str) -> str:
    if os.path.exists(os.path.join(src, "wnids.txt")):
        return "tinyimagenet"
    return "imagefolder"


def _images_in(folder: str) -> list[str]:
    return sorted(os.path.join(folder, f) for f in os.listdir(folder)
                  if f.lower().endswith(tuple(f".{e}" for e in IMAGE_EXTS)) and os.path.isfile(os.path.join(folder, f)))


def imagefolder_split(root: str, classes: list[str] | None = None) -> tuple[list[str], list[Item]]:
    found = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not found:
        raise ShardError(f"{root}: no class folders (expected {root}/<class>/*.jpg)")
    if classes is not None and found != classes:
        missing, extra = sorted(set(classes) - set(found)), sorted(set(found) - set(classes))
        raise ShardError(f"{root}: class folders differ from train's: missing {missing[:5]}, "
                         f"extra {extra[:5]}")
    classes = found
    items = [Item(p, i) for i, c in enumerate(classes) for p in _images_in(os.path.join(root, c))]
    return classes, items


def tinyimagenet_splits(src: str) -> tuple[list[str], dict[str, list[Item]]]:
    with open(os.path.join(src, "wnids.txt")) as f:
        wnids = [line.strip() for line in f if line.strip()]
    index = {w: i for i, w in enumerate(wnids)}
    splits: dict[str, list[Item]] = {"train": []}
    for w in wnids:
        folder = os.path.join(src, "train", w, "images")
        if not os.path.isdir(folder):
            raise ShardError(f"{folder}: missing (wnids.txt lists {w})")
        splits["train"] += [Item(p, index[w]) for p in _images_in(folder)]
    ann = os.path.join(src, "val", "val_annotations.txt")
    if os.path.exists(ann):
        splits["val"] = []
        with open(ann) as f:
            for n, line in enumerate(f, 1):
                parts = line.split("\t")
                if len(parts) < 2:
                    continue
                if parts[1] not in index:
                    raise ShardError(f"{ann}:{n}: class {parts[1]!r} is not in wnids.txt")
                splits["val"].append(Item(os.path.join(src, "val", "images", parts[0]), index[parts[1]]))
    return wnids, splits


def load_checked(item: Item) -> tuple[bytes, str] | str:
    """(bytes, member ext) for a decodable image, else the reason it is rejected."""
    try:
        with open(item.path, "rb") as f:
            data = f.read()
        if not data:
            return "empty file"
        with Image.open(item.path) as im:
            fmt = im.format
            im.load()  # full decode: catches truncated and corrupted files
    except Exception as e:  # noqa: BLE001 - PIL raises many types; each is reported
        return f"{e.__class__.__name__}: {e}"
    ext = PIL_FORMATS.get(fmt)
    return (data, ext) if ext else f"unsupported image format {fmt} (the reader decodes {', '.join(IMAGE_EXTS)})"


# ---------------------------------------------------------------- one shard, in a worker
PARTS = ".parts"  # <split>/.parts/<shard>.json: a finished shard's record (what a resumed build keeps)


def _job_hash(items: list[Item], first: int) -> str:
    h = hashlib.sha256(f"{first}\n".encode())
    for it in items:
        h.update(f"{it.path}\t{it.label}\n".encode())
    return h.hexdigest()[:24]


def _part_path(split_dir: str, name: str) -> str:
    return os.path.join(split_dir, PARTS, name + ".json")


def _done(split_dir: str, name: str, job_hash: str) -> dict | None:
    """A finished shard's record if this build already wrote it (same items, tar and
    index in place and of the size recorded), else None."""
    try:
        with open(_part_path(split_dir, name)) as f:
            part = json.load(f)
    except (OSError, ValueError):
        return None
    rec = part.get("record", {})
    tar = os.path.join(split_dir, name)
    if part.get("job") != job_hash:
        return None
    if part.get("uploaded"):
        return part  # in a bucket: data.upload checks the object is there, as uploaded
    if rec.get("samples") and not (os.path.exists(tar) and os.path.getsize(tar) == rec.get("bytes")
                                   and os.path.exists(index_path_for(tar))):
        return None
    return part


def write_job(job: tuple[str, str, str, int, list[Item]]) -> dict:
    """Pool work: decode-check and write one shard (tar + index in one pass), then its
    record under .parts/. Returns {record, rejected, images, job}."""
    split_dir, name, split, first, items = job
    h = _job_hash(items, first)
    part = _done(split_dir, name, h)
    if part is not None:
        part["reused"] = True
        return part
    rejected: list[list[str]] = []
    samples = []
    for i, item in enumerate(items, first):
        r = load_checked(item)
        if isinstance(r, str):
            rejected.append([item.path, r])
            continue
        samples.append(Sample(key=f"{split}{i:07d}", image=r[0], label=item.label, ext=r[1]))
    rec = write_shard(split_dir, name, samples) if samples else {"name": name, "samples": 0}
    part = {"job": h, "record": rec, "rejected": rejected, "images": len(items)}
    write_atomic(_part_path(split_dir, name), json.dumps(part, sort_keys=True).encode())
    return part


class Progress:
    """Images written: a bar with img/s and an ETA on a terminal (tqdm), else a line a
    minute (a log)."""

    def __init__(self, total: int, what: str):
        self.total, self.what, self.done, self.t0 = total, what, 0, time.monotonic()
        self.bar = tqdm(total=total, unit="img", desc=what, smoothing=0.1) if sys.stderr.isatty() else None

    def add(self, n: int, reused: bool = False) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif pool.tick(self.t0) or self.done == self.total:
            dt = max(time.monotonic() - self.t0, 1e-9)
            rate = self.done / dt
            eta = (self.total - self.done) / rate if rate else 0.0
            print(f"{self.what}: {self.done}/{self.total} images, {rate:.0f} img/s, ETA {eta:.0f} s", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def write_split_parallel(items: list[Item], split_dir: str, classes: list[str], split: str, shard_size: int,
                         extra: dict, workers: int | None, upload=None) -> tuple[dict, list[tuple[str, str]], int]:
    """Every shard of a split, `workers` at a time; shards a killed build finished are kept.
    `upload(split_dir, part)`: each finished shard's upload (`--out s3://...`), while the
    workers write the next ones. (info, rejected, shards reused)."""
    os.makedirs(os.path.join(split_dir, PARTS), exist_ok=True)
    for stray in glob.glob(os.path.join(split_dir, "*.tar.tmp*")) + glob.glob(os.path.join(split_dir, "*.idx.tmp*")) + \
            glob.glob(os.path.join(split_dir, PARTS, "*.json.tmp*")):
        os.remove(stray)  # a killed build's half-written tar or index
    jobs = [(split_dir, shard_name(split, j), split, i, items[i:i + shard_size])
            for j, i in enumerate(range(0, len(items), shard_size))]
    records, rejected, reused = [], [], 0
    bar = Progress(len(items), split)
    try:
        for part in pool.imap(write_job, jobs, workers):
            if upload is not None:
                part = upload(split_dir, part)
            records.append(dict(sorted(part["record"].items())))  # as a kept record reads back
            rejected += [tuple(r) for r in part["rejected"]]
            reused += bool(part.get("reused"))
            bar.add(part["images"], bool(part.get("reused")))
    finally:
        bar.close()
    shards = [r for r in records if r["samples"]]
    if not shards:
        raise ShardError(f"{split_dir}: no samples to write for split {split!r}")
    info = write_info(split_dir, shards, classes, split,
                      {**extra, "rejected": len(rejected), "rejected_files": [f"{p}: {why}" for p, why in rejected[:1000]]})
    if upload is not None:
        upload(split_dir, None)  # _info.json last: a bucket with it is complete
    return info, rejected, reused


def make(src: str, out: str, layout: str = "auto", shard_size: int = 1000, seed: int = 0,
         workers: int | None = None, staging: str = "") -> dict:
    """Shards for every split of `src` in `out`, `workers` processes (default: every core)
    writing whole shards. Run again after a kill, it keeps the shards already finished and
    writes the rest: the result is byte-identical to an uninterrupted build. `out` may be a
    bucket (`s3://b/p/`, `gs://b/p/`): shards are written into `staging` (default in the
    cache) and each is uploaded when finished (data/upload.py)."""
    from hvdtrain.data import remote

    upload = None
    if remote.is_remote(out):
        from hvdtrain.data.upload import Uploader

        upload = Uploader(out, staging, _part_path)
        out = upload.staging
    layout = detect_layout(src) if layout == "auto" else layout
    if layout == "tinyimagenet":
        classes, splits = tinyimagenet_splits(src)
    elif layout == "imagefolder":
        if os.path.isdir(os.path.join(src, "train")):
            classes, train = imagefolder_split(os.path.join(src, "train"))
            splits = {"train": train}
            if os.path.isdir(os.path.join(src, "val")):
                splits["val"] = imagefolder_split(os.path.join(src, "val"), classes)[1]
        else:
            classes, items = imagefolder_split(src)
            splits = {"train": items}
    else:
        raise ShardError(f"unknown layout {layout!r}")
    os.makedirs(out, exist_ok=True)
    write_atomic(os.path.join(out, "classes.txt"), "".join(f"{i}\t{c}\n" for i, c in enumerate(classes)).encode())
    report = {}
    for split, items in splits.items():
        random.Random(seed).shuffle(items)  # DALI reads tars in order: shuffle before writing
        extra = {"source": os.path.abspath(src), "layout": layout, "shuffled": True}
        info, rejected, reused = write_split_parallel(items, os.path.join(out, split), classes, split, shard_size,
                                                      extra, workers, upload and upload.for_split(split))
        report[split] = (info, rejected)
        info["reused_shards"] = reused
    if upload is not None:
        upload.put(os.path.join(out, "classes.txt"), "classes.txt")
    return report


def index_only(spec: str, index_dir: str = "", workers: int | None = None) -> str:
    """`--index-only`: the missing (or stale) indexes of a shard set, found and built the
    way training does (data.shards: beside the tars, --index-dir, or the cache). A bucket's
    are built from the shards' bytes (streamed in parallel) and uploaded beside them."""
    from hvdtrain.data import remote

    if remote.is_remote(spec):
        from hvdtrain.data.upload import index_bucket

        return index_bucket(spec, index_dir, lambda s: print(s, flush=True))
    paths = resolve_shards(spec)
    t0 = time.monotonic()
    idx, _, where = ensure_indexes(paths, index_dir, workers=workers, log=lambda s: print(s, flush=True))
    samples = sum(read_index_count(i) for i in idx)
    built = where.pop("built", 0)
    places = ", ".join(f"{n} {k}" for k, n in sorted(where.items()))
    return (f"{spec}: {len(paths)} shard(s), {samples} samples indexed; {built} index(es) built in "
            f"{time.monotonic() - t0:.1f} s (indexes: {places})")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image tree (or, with --index-only, a shard folder/pattern)")
    p.add_argument("out", nargs="?")
    p.add_argument("--layout", default="auto", choices=["auto", "imagefolder", "tinyimagenet"])
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--workers", type=int, default=0, help="processes writing shards (default: every core "
                                                          "this process may use)")
    p.add_argument("--index-only", action="store_true", help="build missing .idx files (beside the tars, "
                                                             "else --index-dir, else the cache)")
    p.add_argument("--index-dir", default="", help="with --index-only: keep the indexes here "
                                                   "(training's --data.index_dir)")
    p.add_argument("--staging", default="", help="OUT in a bucket: where shards are written before their upload "
                                                 "(default: under $HVDTRAIN_CACHE); removed once uploaded")
    a = p.parse_args(argv)
    from hvdtrain.data import nodecache

    try:
        if a.index_only:
            print(index_only(a.src, a.index_dir, a.workers or None))
            return 0
        if not a.out:
            p.error("OUT is required")
        for split, (info, rejected) in make(a.src, a.out, a.layout, a.shard_size, a.seed, a.workers or None,
                                            a.staging).items():
            kept = f", {info['reused_shards']} finished shard(s) kept" if info.get("reused_shards") else ""
            print(f"{split}: {info['total']} samples, {len(info['shards'])} shard(s), "
                  f"{info['num_classes']} classes, fingerprint {info['fingerprint']}, "
                  f"rejected {len(rejected)}{kept}")
            for path, why in rejected:
                print(f"  rejected {path}: {why}", file=sys.stderr)
    except ShardError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    finally:
        nodecache.close_all()
    return 0


if __name__ == "__main__":
    sys.exit(main())
