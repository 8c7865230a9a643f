"""Check shards before (or instead of) finding out mid-training: every problem in one pass.

    python -m data.verify shards/train [--val shards/val] [--no-decode] [--json report.json]

Per shard: the tar reads to its end (truncated tars), the `.idx` exists and matches the
tar (stale indexes), the counts and sha256 match `_info.json` (the data fingerprint).
Per sample: it has an image (`.jpg/.jpeg/.png`, any case) and a `.cls`, the label is a
decimal class index in range, and the image decodes (PIL; the same files DALI rejects).
Train and val must name the same classes. Exit 0 clean, 1 problems found, 2 bad usage.

The same checks serve training: `locate()` names the bad samples in a rank's part of
the data when DALI stops, and `skip_index()` writes indexes without them for
`--data.on_error=skip`.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field

from data.wds import (IMAGE_EXTS, INFO_NAME, LABEL_WIDTH, ShardError, ShardSet, file_sha256, index_path_for,
                      iter_samples, rank_range, read_index, resolve_shards, scan_tar, split_name, write_index_rows)


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


def check_sample(comps: dict[str, bytes], num_classes: int | None, decode: bool = True) -> str | None:
    images = [e for e in comps if e.lower() in IMAGE_EXTS]
    if not images:
        return f"no image member (has {sorted(comps) or 'nothing'}); the reader needs .jpg/.jpeg/.png"
    if "cls" not in comps:
        return "no .cls label member"
    return check_label(comps["cls"], num_classes) or (check_image(comps[images[0]]) if decode else None)


# ---------------------------------------------------------------- shards
def check_shard(tar: str, num_classes: int | None, decode: bool = True) -> tuple[int, list[Problem]]:
    """(samples in the tar, problems) for one shard: tar, index, every sample."""
    problems: list[Problem] = []
    size = os.path.getsize(tar)
    layout, broken = scan_tar(tar, tolerant=True)
    end = max((o + -(-s // 512) * 512 for comps in layout for _, o, s, _ in comps), default=0)
    if broken or size < end + 1024 or size % 512:  # a whole tar ends with two zero blocks after its last member
        problems.append(Problem(tar, f"truncated tar: {size} bytes, it ends inside or right after member "
                                     f"{len(layout)} ({broken or 'no end-of-archive marker'}); re-copy or rebuild it"))
    idx = index_path_for(tar)
    if not os.path.exists(idx):
        problems.append(Problem(idx, "missing DALI index; training builds it, or run "
                                     f"`python -m data.make_shards --index-only {os.path.dirname(tar) or '.'}`"))
    else:
        try:
            if read_index(idx) != layout:
                problems.append(Problem(idx, f"stale index: it does not describe {os.path.basename(tar)} "
                                             "(rebuild with `python -m data.make_shards --index-only`)"))
        except (ShardError, ValueError, IndexError) as e:
            problems.append(Problem(idx, f"unreadable index ({e})"))
    n = 0
    try:
        for key, comps in iter_samples(tar):
            n += 1
            why = check_sample(comps, num_classes, decode)
            if why:
                problems.append(Problem(tar, why, key))
    except Exception as e:  # noqa: BLE001 - a damaged tar: reported, and the pass goes on
        problems.append(Problem(tar, f"tar stops being readable after {n} samples ({e.__class__.__name__}: {e})"))
    return len(layout), problems


def verify_split(spec: str, decode: bool = True, num_classes: int | None = None) -> tuple[dict, list[Problem]]:
    try:
        paths = resolve_shards(spec)
    except ShardError as e:
        return {"spec": spec, "shards": 0, "samples": 0, "bad": 0}, [Problem(spec, str(e))]
    info_path = os.path.join(os.path.dirname(os.path.abspath(paths[0])), INFO_NAME)
    info = json.load(open(info_path)) if os.path.exists(info_path) else None
    num_classes = (info.get("num_classes") if info else None) or num_classes
    problems: list[Problem] = []
    by_name = {s["name"]: s for s in info.get("shards", [])} if info else {}
    total = 0
    for tar in paths:
        n, found = check_shard(tar, num_classes, decode)
        total += n
        problems += found
        rec = by_name.get(os.path.basename(tar))
        if rec is not None and rec.get("samples") != n:
            problems.append(Problem(tar, f"holds {n} samples but {info_path} says {rec['samples']}"))
        if rec is not None and rec.get("sha256") and rec["sha256"] != file_sha256(tar):
            problems.append(Problem(tar, f"content differs from the sha256 in {info_path}: the shard changed "
                                         "after it was written, so the data fingerprint no longer describes it"))
    bad = sum(1 for p in problems if p.key)
    summary = {"spec": spec, "shards": len(paths), "samples": total, "bad": bad, "num_classes": num_classes,
               "classes": info.get("classes") if info else None, "info": info_path if info else None}
    return summary, problems


def verify(train: str, val: str | None = None, decode: bool = True, num_classes: int | None = None) -> Report:
    rep = Report()
    for split, spec in (("train", train), ("val", val)):
        if spec:
            rep.splits[split], found = verify_split(spec, decode, num_classes)
            rep.problems += found
    t, v = rep.splits.get("train", {}), rep.splits.get("val")
    if v and t.get("classes") and v.get("classes") and t["classes"] != v["classes"]:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(t["classes"], v["classes"])) if a != b]
        rep.problems.append(Problem(f"{val}", f"val classes differ from train's ({len(t['classes'])} vs "
                                              f"{len(v['classes'])}; first differences {diff[:3]})"))
    return rep


# ---------------------------------------------------------------- for training
def locate(shards: ShardSet, shard_id: int, num_shards: int, num_classes: int | None,
           budget_s: float = 60.0) -> tuple[list[Problem], bool]:
    """Bad samples in one rank's part of the data, for the message when DALI stops:
    (problems, complete). Gives up after `budget_s` (complete=False)."""
    lo, hi = rank_range(shards.total, shard_id, num_shards)
    t0, start, found = time.monotonic(), 0, []
    for tar, n in zip(shards.paths, shards.counts):
        if start + n > lo and start < hi:
            for i, (key, comps) in enumerate(iter_samples(tar)):
                if lo <= start + i < hi:
                    why = check_sample(comps, num_classes)
                    if why:
                        found.append(Problem(tar, why, key))
                if time.monotonic() - t0 > budget_s:
                    return found, False
            _, shard_problems = check_shard(tar, num_classes, decode=False)
            found += [p for p in shard_problems if p.key is None and p not in found]
        start += n
    return found, True


def locate_indexed(shards: ShardSet, num_classes: int | None, budget_s: float = 60.0) -> tuple[list[Problem], bool]:
    """Like `locate`, for a shard set whose indexes list some samples of their tars (one
    rank's interleaved slice: hvdtrain/shard_order.py): each listed sample is read at its
    offsets and checked. (problems, complete)."""
    t0, found = time.monotonic(), []
    for tar, idx in zip(shards.paths, shards.index_paths):
        with open(tar, "rb") as f:
            for comps in read_index(idx):
                key = split_name(comps[0][3])[0] if comps else "?"
                members = {split_name(name)[1]: os.pread(f.fileno(), n, off) for _, off, n, name in comps}
                why = check_sample(members, num_classes)
                if why and all(p.key != key or p.where != tar for p in found):
                    found.append(Problem(tar, why, key))
                if time.monotonic() - t0 > budget_s:
                    return found, False
    return found, True


def skip_index(tar: str, out_idx: str, num_classes: int | None) -> tuple[int, list[Problem]]:
    """Write `out_idx` listing only the good samples of `tar` (built from the tar itself, so
    a stale or missing index does not matter). Returns (samples kept, problems skipped)."""
    size = os.path.getsize(tar)
    layout, _ = scan_tar(tar, tolerant=True)
    keep, skipped = [], []
    reasons = {key: check_sample(comps, num_classes) for key, comps in iter_samples_safe(tar)}  # streamed
    for comps in layout:
        key = split_name(comps[0][3])[0]
        if any(o + s > size for _, o, s, _ in comps):
            why = "cut off by the end of a truncated tar"
        else:
            why = reasons.get(key, "unreadable: the tar is damaged before it")
        if why:
            skipped.append(Problem(tar, why, key))
        else:
            keep.append(comps)
    idx = index_path_for(tar)
    if os.path.exists(idx):  # samples the index lists but the (truncated) tar no longer holds
        seen = {split_name(comps[0][3])[0] for comps in layout}
        try:
            listed = [split_name(row[0][3])[0] for row in read_index(idx) if row]
        except (ShardError, ValueError, IndexError):
            listed = []
        skipped += [Problem(tar, "cut off by the end of a truncated tar", k) for k in listed if k not in seen]
    write_index_rows(out_idx, keep)
    return len(keep), skipped


def iter_samples_safe(tar: str):
    """iter_samples that stops quietly where a damaged tar stops being readable."""
    try:
        yield from iter_samples(tar)
    except Exception:  # noqa: BLE001 - the caller reports the samples it did not get
        return


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("train", help="shard folder, .tar, brace pattern or glob")
    p.add_argument("--val", help="validation shards: checked too, and their classes against train's")
    p.add_argument("--no-decode", action="store_true", help="skip decoding images (structure and labels only)")
    p.add_argument("--num-classes", type=int, help="label range for shards without _info.json")
    p.add_argument("--json", help="also write the report here")
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    rep = verify(a.train, a.val, decode=not a.no_decode, num_classes=a.num_classes)
    for split, s in rep.splits.items():
        print(f"{split}: {s['spec']}: {s['shards']} shard(s), {s['samples']} samples, {s['bad']} bad sample(s)")
    for prob in rep.problems:
        print(f"  {prob}")
    print(f"{len(rep.problems)} problem(s) in {time.perf_counter() - t0:.1f} s" if rep.problems
          else f"OK ({time.perf_counter() - t0:.1f} s)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"splits": rep.splits, "problems": [asdict(x) for x in rep.problems]}, f, indent=1)
    return 0 if rep.ok else 1


if __name__ == "__main__":
    sys.exit(main())
