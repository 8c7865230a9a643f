"""A learnable procedural image set, JPEG-encoded, written as WebDataset shards.

    python -m data.synth OUT --classes 10 --train 4096 --val 1024 --size 64 --seed 1337
    python -m data.synth TREE --tree tinyimagenet --classes 20 --train 200 --val 25   # loose JPEGs

Each class has its own shape (disc, square, triangle, cross, ring, stripes, ...), colour
and texture; position, scale, rotation, background and pixel noise vary per image, so
a model must learn shape and colour, not memorise pixels. Writes `OUT/train` and
`OUT/val`, each with `<split>-NNNNNN.tar` + `.idx` + `_info.json`.
"""
from __future__ import annotations

import argparse
import io
import math
import os
import sys

import numpy as np
from PIL import Image, ImageDraw

from hvdtrain.data.wds import Sample, write_split

SHAPES = ("disc", "square", "triangle", "cross", "ring", "hstripes", "vstripes", "diamond",
          "checker", "dots")


def class_style(c: int, num_classes: int) -> tuple[str, np.ndarray]:
    """Shape by class mod 10, hue spread over the classes."""
    shape = SHAPES[c % len(SHAPES)]
    hue = (c * 0.61803398875) % 1.0  # golden-ratio spacing: neighbouring classes differ
    rgb = np.array([0.5 + 0.5 * math.cos(2 * math.pi * (hue + k / 3)) for k in range(3)])
    return shape, rgb


def render(c: int, num_classes: int, size: int, rng: np.random.Generator) -> Image.Image:
    shape, rgb = class_style(c, num_classes)
    bg = rng.uniform(0.0, 0.35, size=3)
    img = Image.new("RGB", (size, size), tuple(int(255 * v) for v in bg))
    draw = ImageDraw.Draw(img)
    fg = np.clip(rgb + rng.normal(0, 0.08, 3), 0, 1)
    col = tuple(int(255 * v) for v in fg)
    r = size * rng.uniform(0.22, 0.38)
    cx, cy = rng.uniform(r, size - r, size=2)
    w = max(2, int(r / 3))
    if shape == "disc":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=col)
    elif shape == "triangle":
        a = rng.uniform(0, 2 * math.pi)
        pts = [(cx + r * math.cos(a + k * 2 * math.pi / 3), cy + r * math.sin(a + k * 2 * math.pi / 3))
               for k in range(3)]
        draw.polygon(pts, fill=col)
    elif shape == "cross":
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=col)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=col)
    elif shape == "ring":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], outline=col, width=w)
    elif shape == "hstripes":
        for y in range(int(cy - r), int(cy + r), 2 * w):
            draw.rectangle([cx - r, y, cx + r, y + w - 1], fill=col)
    elif shape == "vstripes":
        for x in range(int(cx - r), int(cx + r), 2 * w):
            draw.rectangle([x, cy - r, x + w - 1, cy + r], fill=col)
    elif shape == "diamond":
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
    elif shape == "checker":
        for i in range(4):
            for j in range(4):
                if (i + j) % 2 == 0:
                    x0, y0 = cx - r + i * r / 2, cy - r + j * r / 2
                    draw.rectangle([x0, y0, x0 + r / 2, y0 + r / 2], fill=col)
    elif shape == "dots":
        for _ in range(6):
            dx, dy = rng.uniform(-r, r, 2)
            draw.ellipse([cx + dx - w, cy + dy - w, cx + dx + w, cy + dy + w], fill=col)
    arr = np.asarray(img, dtype=np.float32)
    arr += rng.normal(0, 12.0, arr.shape)  # pixel noise
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=quality)
    return buf.getvalue()


def samples(n: int, num_classes: int, size: int, seed: int, split: str):
    rng = np.random.default_rng([seed, 0 if split == "train" else 1])
    labels = rng.integers(0, num_classes, size=n)  # random order: shards come out shuffled
    for i, c in enumerate(labels):
        yield Sample(key=f"{split}{i:07d}", image=jpeg_bytes(render(int(c), num_classes, size, rng)),
                     label=int(c))


def make(out: str, classes: int, train: int, val: int, size: int, seed: int,
         shard_size: int = 1000) -> dict:
    names = [f"class{c:03d}" for c in range(classes)]
    extra = {"source": "data.synth", "synth": {"classes": classes, "size": size, "seed": seed},
             "shuffled": True}  # written in random order (the loader need not interleave tars)
    infos = {}
    for split, n in (("train", train), ("val", val)):
        if n > 0:
            infos[split] = write_split(samples(n, classes, size, seed, split), os.path.join(out, split),
                                       names, split, shard_size, extra)
    return infos


def write_tinyimagenet_tree(out: str, classes: int, train_per_class: int, val_per_class: int, size: int,
                            seed: int) -> list[str]:
    """The same images as loose JPEGs in Tiny-ImageNet's layout (wnids.txt,
    train/<wnid>/images/<wnid>_<i>.JPEG, val/images + val_annotations.txt), to exercise
    `data.make_shards` end to end where the real Tiny-ImageNet cannot be downloaded."""
    rng = np.random.default_rng([seed, 7])
    wnids = [f"n{90000000 + c:08d}" for c in range(classes)]
    with open(os.path.join(_mkdir(out), "wnids.txt"), "w") as f:
        f.write("\n".join(wnids) + "\n")
    for c, w in enumerate(wnids):
        folder = _mkdir(os.path.join(out, "train", w, "images"))
        for i in range(train_per_class):
            render(c, classes, size, rng).save(os.path.join(folder, f"{w}_{i}.JPEG"), quality=90)
    folder = _mkdir(os.path.join(out, "val", "images"))
    with open(os.path.join(out, "val", "val_annotations.txt"), "w") as f:
        for i in range(classes * val_per_class):
            c = i % classes
            render(c, classes, size, rng).save(os.path.join(folder, f"val_{i}.JPEG"), quality=90)
            f.write(f"val_{i}.JPEG\t{wnids[c]}\t0\t0\t{size - 1}\t{size - 1}\n")
    return wnids


def _mkdir(path: str) -> str:
    os.makedirs(path, exist_ok=True)
    return path


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m data.synth", description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--train", type=int, default=4096, help="training images")
    p.add_argument("--val", type=int, default=1024, help="validation images")
    p.add_argument("--size", type=int, default=64, help="image side, pixels")
    p.add_argument("--seed", type=int, default=1337)
    p.add_argument("--shard-size", type=int, default=1000, help="samples per tar")
    p.add_argument("--tree", choices=["tinyimagenet"], help="write loose JPEGs in this layout instead of "
                   "shards (--train/--val are then images per class); build shards with data.make_shards")
    a = p.parse_args(argv)
    if a.tree:
        wnids = write_tinyimagenet_tree(a.out, a.classes, a.train, a.val, a.size, a.seed)
        print(f"{a.out}: Tiny-ImageNet layout, {len(wnids)} classes, {a.train} train + {a.val} val images each")
        return 0
    infos = make(a.out, a.classes, a.train, a.val, a.size, a.seed, a.shard_size)
    for split, info in infos.items():
        print(f"{split}: {info['total']} samples in {len(info['shards'])} shard(s) under "
              f"{os.path.join(a.out, split)}  fingerprint {info['fingerprint']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
