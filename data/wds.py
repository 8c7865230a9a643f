"""WebDataset shards: writing, DALI indexes, `_info.json`, path expansion, fingerprints.

A shard is a plain POSIX tar of samples `<key>.jpg` (image bytes) + `<key>.cls` (the
label as ASCII decimal, the WebDataset convention), so `webdataset.WebDataset` reads it.
Beside each `<shard>.tar` sits `<shard>.idx` in the format DALI's `wds2idx` writes:

    v1.2 <num_samples>
    <ext> <data_offset> <size> <member name> [<ext> <data_offset> <size> <name> ...]

one line per sample, offsets pointing at the member's data (its 512-byte header + 512).
Without an index DALI parses every tar at start-up. Each split folder gets `_info.json`
with per-shard counts and sha256, the total, the classes and a content fingerprint.
"""
from __future__ import annotations

import glob
import hashlib
import io
import json
import os
import re
import tarfile
import time
from dataclasses import dataclass, field
from typing import Iterable, Iterator

INFO_NAME = "_info.json"
INFO_FORMAT = "hvdtrain-shards-v1"
IMAGE_EXTS = ("jpg", "jpeg", "png")  # image members a sample may carry (any letter case)
LABEL_WIDTH = 16  # bytes: `.cls` text longer than LABEL_WIDTH - 1 is refused (the pipeline pads to this)


class ShardError(ValueError):
    """A problem with shard files that the user must fix; the message names the file."""


# ---------------------------------------------------------------- writing
@dataclass
class Sample:
    key: str          # no dots: DALI takes everything after the first dot as the extension
    image: bytes
    label: int
    ext: str = "jpg"


@dataclass
class ShardWriter:
    """Write samples into `<out>/<prefix>-NNNNNN.tar` (+ `.idx`), `shard_size` per tar."""
    out_dir: str
    prefix: str = "shard"
    shard_size: int = 1000
    shards: list[dict] = field(default_factory=list)
    _tar: tarfile.TarFile | None = None
    _fh: io.BufferedWriter | None = None
    _sha: "hashlib._Hash | None" = None
    _count: int = 0

    def __post_init__(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)

    def _open(self) -> None:
        name = f"{self.prefix}-{len(self.shards):06d}.tar"
        self.shards.append({"name": name, "samples": 0})
        self._fh = open(os.path.join(self.out_dir, name), "wb")
        self._tar = tarfile.open(fileobj=self._fh, mode="w", format=tarfile.USTAR_FORMAT)
        self._count = 0

    def _add(self, name: str, payload: bytes) -> None:
        info = tarfile.TarInfo(name)
        info.size = len(payload)
        info.mtime = 0  # reproducible tars: same content, same bytes, same fingerprint
        info.mode = 0o644
        assert self._tar is not None
        self._tar.addfile(info, io.BytesIO(payload))

    def write(self, sample: Sample) -> None:
        if "." in sample.key or "/" in sample.key:
            raise ShardError(f"sample key {sample.key!r} must not contain '.' or '/'")
        if self._tar is None or self._count >= self.shard_size:
            self._close()
            self._open()
        self._add(f"{sample.key}.{sample.ext}", sample.image)
        self._add(f"{sample.key}.cls", str(int(sample.label)).encode())
        self._count += 1
        self.shards[-1]["samples"] = self._count

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        assert self._fh is not None
        self._fh.close()
        path = os.path.join(self.out_dir, self.shards[-1]["name"])
        write_index(path)
        self.shards[-1]["bytes"] = os.path.getsize(path)
        self.shards[-1]["sha256"] = file_sha256(path)
        self._tar = None

    def close(self) -> list[dict]:
        self._close()
        return self.shards


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def split_name(member: str) -> tuple[str, str]:
    """`dir/abc.seg.jpg` -> (`dir/abc`, `seg.jpg`): the extension starts at the first dot."""
    base_start = member.rfind("/") + 1
    dot = member.find(".", base_start)
    if dot < 0:
        return member, ""
    return member[:dot], member[dot + 1:]


def scan_tar(path: str, tolerant: bool = False):
    """Samples of a tar as [(ext, data_offset, size, member name), ...] groups, in order.

    `tolerant=True` returns `(layout, why)`: the samples up to where a damaged tar stops
    being readable, and why it stopped (None for a whole tar) — for `data.verify` and
    `--data.on_error=skip`. Otherwise a damaged tar raises ShardError naming it."""
    samples: list[list[tuple[str, int, int, str]]] = []
    last = None
    try:
        with tarfile.open(path, "r:") as tar:
            for m in tar:
                if not m.isreg():
                    continue
                base, ext = split_name(m.name)
                if not base or base.endswith("/") or os.path.basename(base) == "":
                    continue  # hidden files (".foo") are not samples, as in wds2idx
                if base != last:
                    samples.append([])
                    last = base
                samples[-1].append((ext, m.offset_data, m.size, m.name))
    except (tarfile.TarError, EOFError, OSError) as e:
        if tolerant:
            return samples, f"{e.__class__.__name__}: {e}"
        raise ShardError(f"{path}: not a readable tar ({e.__class__.__name__}: {e})") from e
    return (samples, None) if tolerant else samples


def write_index_rows(idx_path: str, samples: list[list[tuple[str, int, int, str]]]) -> int:
    """Write a wds2idx v1.2 index listing `samples` (atomically); returns their count."""
    tmp = f"{idx_path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(f"v1.2 {len(samples)}\n")
        for comps in samples:
            f.write(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) + "\n")
    os.replace(tmp, idx_path)
    return len(samples)


def read_index(idx_path: str) -> list[list[tuple[str, int, int, str]]]:
    """The sample groups a wds2idx index lists (the inverse of write_index_rows)."""
    with open(idx_path) as f:
        head = f.readline().split()
        rows = []
        for line in f:
            p = line.split()
            rows.append([(p[i], int(p[i + 1]), int(p[i + 2]), p[i + 3]) for i in range(0, len(p) - 3, 4)])
    if len(head) != 2 or not head[0].startswith("v1.") or int(head[1]) != len(rows):
        raise ShardError(f"{idx_path}: not a valid wds2idx index (header {' '.join(head)!r}, {len(rows)} rows)")
    return rows


def rank_range(total: int, shard_id: int, num_shards: int) -> tuple[int, int]:
    """The global sample indices [lo, hi) DALI's reader gives one rank: contiguous, by
    global index over the tars in the order given (the torch loader shards the same way)."""
    return total * shard_id // num_shards, total * (shard_id + 1) // num_shards


def write_index(tar_path: str, idx_path: str | None = None) -> int:
    """Write the DALI (wds2idx v1.2) index for `tar_path`; returns the sample count."""
    samples = scan_tar(tar_path)
    if not samples:
        raise ShardError(f"{tar_path}: no samples in this tar")
    return write_index_rows(idx_path or index_path_for(tar_path), samples)


def index_path_for(tar_path: str) -> str:
    return tar_path[:-4] + ".idx" if tar_path.endswith(".tar") else tar_path + ".idx"


def check_index_fits(tar_path: str, idx_path: str) -> None:
    """Cheap start-up check (two small reads): the index's first and last members lie
    inside the tar and the tar headers there carry their names. Catches truncated tars
    and stale indexes before DALI reads garbage; `data.verify` checks everything."""
    with open(idx_path) as f:
        lines = [line.split() for line in f]
    if len(lines) < 2:
        return
    size = os.path.getsize(tar_path)
    with open(tar_path, "rb") as t:
        for row in (lines[1], lines[-1]):
            off, n, name = int(row[1]), int(row[2]), row[3]
            if off + n > size:
                raise ShardError(f"{tar_path}: truncated tar ({size} bytes) or stale index {idx_path} (member "
                                 f"{name} at {off}+{n} lies past the end); re-copy the shard, or check it with "
                                 f"`python -m data.verify {tar_path}`")
            t.seek(off - 512)
            header = t.read(100).rstrip(b"\0").decode(errors="replace")
            if header != name:
                raise ShardError(f"{tar_path}: stale index {idx_path}: it says {name} starts at {off}, the tar "
                                 f"has {header!r} there; rebuild it with `python -m data.make_shards "
                                 f"--index-only {os.path.dirname(tar_path) or '.'}`")


def read_index_count(idx_path: str) -> int:
    with open(idx_path) as f:
        head = f.readline().split()
    if len(head) != 2 or not head[0].startswith("v1."):
        raise ShardError(f"{idx_path}: not a DALI wds2idx index (first line {' '.join(head)!r})")
    return int(head[1])


def write_info(split_dir: str, shards: list[dict], classes: list[str], split: str,
               extra: dict | None = None) -> dict:
    total = sum(s["samples"] for s in shards)
    fp = hashlib.sha256()
    for s in sorted(shards, key=lambda s: s["name"]):
        fp.update(f"{s['name']} {s['samples']} {s['sha256']}\n".encode())
    info = {
        "format": INFO_FORMAT,
        "split": split,
        "shards": shards,
        "total": total,
        "num_classes": len(classes),
        "classes": classes,
        "fingerprint": fp.hexdigest()[:16],
        "created_unix": int(time.time()),
        **(extra or {}),
    }
    tmp = os.path.join(split_dir, INFO_NAME + ".tmp")
    with open(tmp, "w") as f:
        json.dump(info, f, indent=1)
    os.replace(tmp, os.path.join(split_dir, INFO_NAME))
    return info


# ---------------------------------------------------------------- reading
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


def resolve_shards(spec: str) -> list[str]:
    """A directory (its *.tar, sorted), a .tar, a brace pattern or a glob -> tar paths.

    Every path returned exists; an empty result or a missing file is an error that
    names what was asked for.
    """
    if not spec:
        raise ShardError("no shard path given (set --data.train=PATH)")
    if os.path.isdir(spec):
        paths = sorted(glob.glob(os.path.join(spec, "*.tar")))
        if not paths:
            raise ShardError(f"{spec}: directory holds no .tar shards")
        return paths
    paths = []
    for p in expand_braces(spec):
        paths.extend(sorted(glob.glob(p)) if any(c in p for c in "*?[") else [p])
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

    @property
    def total(self) -> int:
        return sum(self.counts)

    def describe(self) -> dict:
        return {"spec": self.spec, "shards": len(self.paths), "first": self.paths[0],
                "last": self.paths[-1], "samples": self.total, "num_classes": self.num_classes,
                "fingerprint": self.fingerprint, "info": self.info_path}


def open_shards(spec: str, build_missing_index: bool = True, check_fit: bool = True) -> ShardSet:
    """Resolve `spec`, check or build the `.idx` beside each tar, read `_info.json`.

    Shards from other tools (webdataset's ShardWriter) have no index: it is built beside
    the tar when the folder is writable (`build_missing_index`), else the error says how
    (`python -m data.make_shards --index-only DIR`). `check_fit=False` leaves truncated
    tars to the caller (`--data.on_error=skip` drops the samples they lost).
    """
    paths = resolve_shards(spec)
    index_paths, counts = [], []
    for p in paths:
        idx = index_path_for(p)
        if not os.path.exists(idx) or os.path.getmtime(idx) < os.path.getmtime(p):
            if not build_missing_index:
                raise ShardError(f"{p}: no up-to-date DALI index {idx}; build it with "
                                 f"`python -m data.make_shards --index-only {os.path.dirname(p) or '.'}`")
            try:
                write_index(p, idx)
            except OSError as e:
                raise ShardError(f"{p}: cannot write its index {idx} ({e}); build indexes "
                                 f"elsewhere with `wds2idx {p} OTHER.idx`") from e
        if check_fit:
            check_index_fits(p, idx)
        index_paths.append(idx)
        counts.append(read_index_count(idx))
    info = _find_info(paths)
    classes = num_classes = None
    if info is not None:
        info_path, data = info
        by_name = {s["name"]: s for s in data.get("shards", [])}
        for p, n in zip(paths, counts):
            s = by_name.get(os.path.basename(p))
            if s is not None and s["samples"] != n:
                raise ShardError(f"{p}: index has {n} samples but {info_path} says {s['samples']}: "
                                 "stale index or shard; rebuild with data.make_shards")
        classes, num_classes = data.get("classes"), data.get("num_classes")
        fingerprint = data["fingerprint"] if len(by_name) == len(paths) else _quick_fingerprint(paths, index_paths)
    else:
        info_path = None
        fingerprint = _quick_fingerprint(paths, index_paths)
    shuffled = bool(info[1].get("shuffled")) if info is not None else None
    return ShardSet(spec, paths, index_paths, counts, num_classes, classes, fingerprint, info_path, shuffled)


def _find_info(paths: list[str]) -> tuple[str, dict] | None:
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


def _quick_fingerprint(paths: list[str], index_paths: list[str]) -> str:
    """For shards without `_info.json`: names, sizes and index contents (member names,
    offsets, sizes) — cheap, and changes whenever the shards' layout changes."""
    h = hashlib.sha256()
    for p, i in zip(paths, index_paths):
        h.update(f"{os.path.basename(p)} {os.path.getsize(p)}\n".encode())
        with open(i, "rb") as f:
            h.update(f.read())
    return "q" + h.hexdigest()[:15]


def iter_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of one tar, in order (for verify and tests)."""
    with tarfile.open(path, "r:") as tar:
        key, comps = None, {}
        for m in tar:
            if not m.isreg():
                continue
            base, ext = split_name(m.name)
            if base != key and key is not None:
                yield key, comps
                comps = {}
            key = base
            f = tar.extractfile(m)
            comps[ext] = f.read() if f else b""
        if key is not None:
            yield key, comps


def write_split(samples: Iterable[Sample], split_dir: str, classes: list[str], split: str,
                shard_size: int, extra: dict | None = None) -> dict:
    writer = ShardWriter(split_dir, prefix=split, shard_size=shard_size)
    for s in samples:
        writer.write(s)
    shards = writer.close()
    if not shards:
        raise ShardError(f"{split_dir}: no samples to write for split {split!r}")
    return write_info(split_dir, shards, classes, split, extra)
