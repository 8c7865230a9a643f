"""Fixtures of the GPU tests: a Horovod session of one rank (pinned to cuda:0 by
dist.init), and shards of photo-like JPEGs."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from hvdtrain.data.shards import open_shards
from hvdtrain.data.wds import Sample, write_split


@pytest.fixture(scope="session")
def hvd():
    from hvdtrain import dist

    dist.init()
    yield dist


def photo_jpeg(rng: np.random.Generator, w: int = 160, h: int = 120) -> bytes:
    """Smooth colour fields, edges and mild noise, saved 4:4:4 (no chroma subsampling):
    decoders then differ only by their IDCT and colour conversion, a few levels."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    f = rng.uniform(0.01, 0.08, size=(3, 2))
    img = np.stack([128 + 90 * np.sin(xx * f[c, 0] + yy * f[c, 1] + rng.uniform(0, 6)) for c in range(3)], -1)
    img[: h // 2, : w // 3] = rng.uniform(0, 255, size=3)  # a flat patch with hard edges
    img += rng.normal(0, 4, img.shape)
    buf = io.BytesIO()
    Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).save(buf, format="JPEG", quality=95, subsampling=0)
    return buf.getvalue()


@pytest.fixture(scope="session")
def photo_shards(tmp_path_factory):
    """48 JPEGs of 160x120 in 2 shards, label = index % 6."""
    out = str(tmp_path_factory.mktemp("photos"))
    rng = np.random.default_rng(12)
    write_split((Sample(f"p{i:05d}", photo_jpeg(rng), i % 6) for i in range(48)), out,
                [str(c) for c in range(6)], "train", shard_size=24)
    return open_shards(out)
