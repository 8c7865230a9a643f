"""Images on disk -> shuffled WebDataset shards with DALI indexes and `_info.json`.

    python -m data.make_shards SRC OUT [--layout auto|imagefolder|tinyimagenet] [--shard-size K]
    python -m data.make_shards --index-only DIR     # add .idx to shards from other tools

Layouts (auto-detected):
  imagefolder   SRC/<class>/*.{jpg,jpeg,png} in any letter case; if SRC/train (and
                SRC/val) exist, each is an ImageFolder split.
  tinyimagenet  SRC/wnids.txt, SRC/train/<wnid>/images/*.JPEG,
                SRC/val/images/*.JPEG with SRC/val/val_annotations.txt.
Class index = sorted class names (the wnids.txt order for Tiny-ImageNet); the mapping is
written to OUT/classes.txt and into each `_info.json`. Samples are shuffled before they
are written, because DALI reads the tars in order. PNGs are stored as PNG (`.png` member,
read by the same `jpg;jpeg;png` extension set); images that PIL cannot decode are
rejected, listed and counted, never written.
"""
from __future__ import annotations

import argparse
import os
import random
import sys
from dataclasses import dataclass

from PIL import Image

from data.wds import IMAGE_EXTS, Sample, ShardError, resolve_shards, write_index, write_info, write_split


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
    except Exception as e:  # noqa: BLE001 - PIL raises many types; we report them all
        return f"{e.__class__.__name__}: {e}"
    if fmt == "JPEG":
        return data, "jpg"
    if fmt == "PNG":
        return data, "png"
    return f"unsupported image format {fmt}"


def to_samples(items: list[Item], split: str, rejected: list[tuple[str, str]]):
    for i, item in enumerate(items):
        r = load_checked(item)
        if isinstance(r, str):
            rejected.append((item.path, r))
            continue
        data, ext = r
        yield Sample(key=f"{split}{i:07d}", image=data, label=item.label, ext=ext)


def make(src: str, out: str, layout: str = "auto", shard_size: int = 1000, seed: int = 0) -> dict:
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
    with open(os.path.join(out, "classes.txt"), "w") as f:
        f.writelines(f"{i}\t{c}\n" for i, c in enumerate(classes))
    report = {}
    for split, items in splits.items():
        random.Random(seed).shuffle(items)  # DALI reads tars in order: shuffle before writing
        rejected: list[tuple[str, str]] = []
        split_dir = os.path.join(out, split)
        info = write_split(to_samples(items, split, rejected), split_dir, classes, split, shard_size,
                           {"source": os.path.abspath(src), "layout": layout, "shuffled": True})
        # counted only now: the generator above rejects while it is written
        info = write_info(split_dir, info["shards"], classes, split,
                          {"source": info["source"], "layout": layout, "shuffled": True, "rejected": len(rejected),
                           "rejected_files": [f"{p}: {why}" for p, why in rejected[:1000]]})
        report[split] = (info, rejected)
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.make_shards", description=__doc__.split("\n\n")[0])
    p.add_argument("src", help="image tree (or, with --index-only, a shard folder/pattern)")
    p.add_argument("out", nargs="?")
    p.add_argument("--layout", default="auto", choices=["auto", "imagefolder", "tinyimagenet"])
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    p.add_argument("--seed", type=int, default=0, help="shuffle seed")
    p.add_argument("--index-only", action="store_true", help="write missing .idx files beside tars")
    a = p.parse_args(argv)
    try:
        if a.index_only:
            for tar in resolve_shards(a.src):
                print(f"{tar}: {write_index(tar)} samples indexed")
            return 0
        if not a.out:
            p.error("OUT is required")
        for split, (info, rejected) in make(a.src, a.out, a.layout, a.shard_size, a.seed).items():
            print(f"{split}: {info['total']} samples, {len(info['shards'])} shard(s), "
                  f"{info['num_classes']} classes, fingerprint {info['fingerprint']}, "
                  f"rejected {len(rejected)}")
            for path, why in rejected:
                print(f"  rejected {path}: {why}", file=sys.stderr)
    except ShardError as e:
        print(f"make_shards: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
