"""What hvdtrain records about shards it did not write: the per-shard record of a header
walk (sample and label counts, the label range, the first odd samples), the quick
fingerprint of a split without `_info.json`, and brace patterns (`train-{000..009}.tar`).
Shared by local folders (`data.shards`) and buckets (`data.bucket`).
"""
from __future__ import annotations

import collections
import hashlib
import os
import re

from hvdtrain.data.tarindex import split_name
from hvdtrain.data.wds import LABEL_WIDTH, is_image_ext

META_VERSION = 1
_BRACE = re.compile(r"\{([^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
    """`a-{000..002}.tar` -> 3 names (zero padding kept); `{a,b}` -> 2 names."""
    m = _BRACE.search(pattern)
    if not m:
        return [pattern]
    body = m.group(1)
    rng = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if rng:
        lo, hi = rng.group(1), rng.group(2)
        width = len(lo) if lo.startswith("0") else 0
        items = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
    else:
        items = body.split(",")
    out: list[str] = []
    for item in items:
        out.extend(expand_braces(pattern[:m.start()] + item + pattern[m.end():]))
    return out


def shard_meta(w, idx_path: str) -> dict:
    """The per-shard record of a header walk: counts, labels, the first odd samples."""
    rec = {"v": META_VERSION, "samples": len(w.samples), "labels": 0, "min": None, "max": None, "max_key": None,
           "bad_label": None, "unlabeled": 0, "unlabeled_first": None, "noimage": 0, "noimage_first": None,
           "index_sha": None, "exts": {}}
    kinds: dict[tuple, bool] = {}  # the extensions of a sample -> has an image (most samples share one)
    values = []
    for comps, raw in zip(w.samples, w.labels):
        exts = tuple(c[0] for c in comps)
        has_image = kinds.get(exts)
        if has_image is None:
            has_image = kinds[exts] = any(is_image_ext(e) for e in exts)
        if not has_image:
            rec["noimage"] += 1
            rec["noimage_first"] = rec["noimage_first"] or [split_name(comps[0][3])[0], sorted(exts)]
        if raw is None:
            rec["unlabeled"] += 1
            rec["unlabeled_first"] = rec["unlabeled_first"] or [split_name(comps[0][3])[0], sorted(exts)]
            values.append(-1)
            continue
        text = raw.strip()
        if not text.isdigit() or len(raw) >= LABEL_WIDTH:
            rec["bad_label"] = rec["bad_label"] or [split_name(comps[0][3])[0], raw[:20].decode(errors="replace")]
            values.append(-1)
            continue
        values.append(int(text))
    counts = collections.Counter(c[0].lower() for comps in w.samples for c in comps)
    rec["exts"] = dict(sorted(counts.items()))
    good = [v for v in values if v >= 0]
    if good:
        rec["labels"], rec["min"], rec["max"] = len(good), min(good), max(good)
        rec["max_key"] = split_name(w.samples[values.index(rec["max"])][0][3])[0]
    with open(idx_path, "rb") as f:
        rec["index_sha"] = hashlib.sha256(f.read()).hexdigest()[:32]
    return rec


def quick_fingerprint(paths: list[str], metas: list[dict], sizes: list[int] | None = None) -> str:
    """For shards without `_info.json`: names, sizes and index contents (their sha256, in the
    per-shard records) — no tar is read again, and it changes when the layout changes. The
    same shards give the same fingerprint in a folder and in a bucket (`sizes`: listed)."""
    h = hashlib.sha256()
    sizes = sizes or [os.path.getsize(p) for p in paths]
    for p, m, n in zip(paths, metas, sizes):
        h.update(f"{p.rsplit('/', 1)[-1]} {n} {m['index_sha']}\n".encode())
    return "q" + h.hexdigest()[:15]
