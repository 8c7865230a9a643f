"""The shard format: what a sample is, writing shards, `_info.json`.

A shard is a plain POSIX tar of samples `<key>.<image ext>` (image bytes) + `<key>.cls`
(the label as ASCII decimal, the WebDataset convention), so `webdataset.WebDataset`
reads it. Beside each `<shard>.tar` sits `<shard>.idx`, the DALI index in `wds2idx`'s
format (`data.tarindex`). Each split folder gets `_info.json` with per-shard counts and
sha256, the total, the classes and a content fingerprint. Opening shards for a run
(paths, indexes, caches) is `data.shards`; one rank's share of them, `data.dataset`.

One list of image extensions (`IMAGE_EXTS`: what DALI 2.4's `fn.decoders.image` decodes,
each checked on its CPU backend) serves the reader, `data.verify` and `data.make_shards`.
"""
from __future__ import annotations

import hashlib
import io
import itertools
import json
import os
import tarfile
from dataclasses import dataclass, field
from typing import Iterable, Iterator

from hvdtrain.data.files import temp_name, write_atomic
from hvdtrain.data.tarindex import ShardError, split_name, write_index_rows, walk

INFO_NAME = "_info.json"
INFO_FORMAT = "hvdtrain-shards-v1"
# image members a sample may carry (any letter case): JPEG, PNG, WebP, BMP, TIFF, JPEG 2000
# and PNM, each checked to decode on DALI 2.4's CPU backend (GIF and AVIF do not: refused by name)
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp", "bmp", "tif", "tiff", "jp2", "j2k", "pnm", "ppm", "pgm", "pbm")
# PIL's format name -> the member extension make_shards writes
PIL_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp", "TIFF": "tiff", "JPEG2000": "jp2",
               "PPM": "ppm"}
LABEL_EXT = "cls"
LABEL_WIDTH = 16  # bytes: `.cls` text longer than LABEL_WIDTH - 1 is refused (the pipeline pads to this)


def is_image_ext(ext: str) -> bool:
    return ext.lower() in IMAGE_EXTS


# ---------------------------------------------------------------- writing
@dataclass
class Sample:
    key: str          # no dots: DALI takes everything after the first dot as the extension
    image: bytes
    label: int
    ext: str = "jpg"


class _Hashing(io.RawIOBase):
    """A file writer that hashes what passes through (the shard's sha256 in the same pass)."""

    def __init__(self, f):
        self.f, self.sha, self.pos = f, hashlib.sha256(), 0

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.f.write(b)
        self.sha.update(b)
        self.pos += len(b)
        return len(b)

    def tell(self) -> int:
        return self.pos


def _member(name: str, size: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, 0, 0o644  # mtime 0: same content, same bytes, same fingerprint
    return info


def write_shard(out_dir: str, name: str, samples: Iterable[Sample]) -> dict:
    """Write `<out_dir>/<name>` and its `.idx` in one pass: the index rows and the sha256 are
    taken as the tar is written (nothing is read back). The tar is written under a temporary
    name and renamed when it is complete, after its index. Returns its `_info.json` record."""
    path = os.path.join(out_dir, name)
    tmp = temp_name(path)
    rows: list[list[tuple[str, int, int, str]]] = []
    with open(tmp, "wb") as raw:
        sink = _Hashing(raw)
        with tarfile.open(fileobj=sink, mode="w", format=tarfile.USTAR_FORMAT) as tar:
            for s in samples:
                if "." in s.key or "/" in s.key:
                    raise ShardError(f"sample key {s.key!r} must not contain '.' or '/'")
                comps = []
                for ext, payload in ((s.ext, s.image), (LABEL_EXT, str(int(s.label)).encode())):
                    tar.addfile(_member(f"{s.key}.{ext}", len(payload)), io.BytesIO(payload))
                    padded = (len(payload) + 511) // 512 * 512  # the data ends the member, padded to a block
                    comps.append((ext, tar.offset - padded, len(payload), f"{s.key}.{ext}"))
                rows.append(comps)
        sha, size = sink.sha.hexdigest(), sink.pos
    if not rows:
        os.remove(tmp)
        return {"name": name, "samples": 0}
    write_index_rows(index_path_for(path), rows)
    os.replace(tmp, path)
    return {"name": name, "samples": len(rows), "bytes": size, "sha256": sha}


@dataclass
class ShardWriter:
    """Write samples into `<out>/<prefix>-NNNNNN.tar` (+ `.idx`), `shard_size` per tar."""
    out_dir: str
    prefix: str = "shard"
    shard_size: int = 1000
    shards: list[dict] = field(default_factory=list)

    def __post_init__(self) -> None:
        os.makedirs(self.out_dir, exist_ok=True)

    def write_all(self, samples: Iterable[Sample]) -> list[dict]:
        it = iter(samples)
        while True:
            chunk = list(itertools.islice(it, self.shard_size))
            if not chunk:
                return self.shards
            self.shards.append(write_shard(self.out_dir, shard_name(self.prefix, len(self.shards)), chunk))


def shard_name(prefix: str, i: int) -> str:
    return f"{prefix}-{i:06d}.tar"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def index_path_for(tar_path: str) -> str:
    return tar_path[:-4] + ".idx" if tar_path.endswith(".tar") else tar_path + ".idx"


def write_index(tar_path: str, idx_path: str | None = None) -> int:
    """Write the DALI (wds2idx v1.2) index for `tar_path` from its headers; returns the count."""
    samples = walk(tar_path, read_exts=()).samples
    if not samples:
        raise ShardError(f"{tar_path}: no samples in this tar")
    return write_index_rows(idx_path or index_path_for(tar_path), samples)


def fingerprint_of(shards: list[dict]) -> str:
    fp = hashlib.sha256()
    for s in sorted(shards, key=lambda s: s["name"]):
        fp.update(f"{s['name']} {s['samples']} {s['sha256']}\n".encode())
    return fp.hexdigest()[:16]


def write_info(split_dir: str, shards: list[dict], classes: list[str], split: str,
               extra: dict | None = None) -> dict:
    """`_info.json`: byte-identical for the same shards and classes (no timestamps), so a
    resumed `make_shards` writes what an uninterrupted one writes."""
    info = {"format": INFO_FORMAT, "split": split, "shards": shards, "total": sum(s["samples"] for s in shards),
            "num_classes": len(classes), "classes": classes, "fingerprint": fingerprint_of(shards), **(extra or {})}
    write_atomic(os.path.join(split_dir, INFO_NAME), json.dumps(info, indent=1).encode())
    return info


def iter_samples(path: str) -> Iterator[tuple[str, dict[str, bytes]]]:
    """(key, {ext: bytes}) for each sample of one tar, grouped as the index groups them
    (`tarindex.walk`), in order (for verify and tests)."""
    w = walk(path, read_exts=(), tolerant=True)
    with open(path, "rb") as f:
        for comps in w.samples:
            yield split_name(comps[0][3])[0], {e: os.pread(f.fileno(), n, o) for e, o, n, _ in comps}
    if w.error:  # the samples before the damage were yielded: the caller counts them
        raise ShardError(f"{path}: not a readable tar ({w.error})")


def write_split(samples: Iterable[Sample], split_dir: str, classes: list[str], split: str,
                shard_size: int, extra: dict | None = None) -> dict:
    shards = [s for s in ShardWriter(split_dir, prefix=split, shard_size=shard_size).write_all(samples) if s["samples"]]
    if not shards:
        raise ShardError(f"{split_dir}: no samples to write for split {split!r}")
    return write_info(split_dir, shards, classes, split, extra)

