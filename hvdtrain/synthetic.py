"""Synthetic data: batches of the real shapes made on the training device, with no reader.

    horovodrun -np 2 python -m hvdtrain.train --data.loader=synthetic [--data.num_classes=1000]
    horovodrun -np 2 python -m hvdtrain.sanity --data.loader=synthetic
    horovodrun -np 2 python -m bench.throughput --data.loader=synthetic

The step then runs with data costing nothing (DeepLearningExamples' `--data-backend
synthetic`, Horovod's synthetic benchmark): the same run on real shards beside it says
whether data or compute limits the run (`bench.throughput` sets the two side by side).

Each rank makes `POOL_BATCHES` micro-batches once, on its training device (no host to
device copy per step, no decode), and cycles through them: each view is [batch, 3, size,
size] float32 drawn from N(0, 1), the range of normalized images, channels_last where
the config asks for it; labels are uniform over `data.num_classes` (default
`DEFAULT_CLASSES`, ImageNet's 1000), drawn from a generator seeded by (seed, rank), so
two runs with the same seed see the same labels. An epoch is one pass over the pool.

A synthetic run reads no data: `--data.train` / `--data.val` are refused with it, it has
no validation, and its banner, config.json, checkpoints and reports say SYNTHETIC (the
data fingerprint is `synthetic-...` with the shapes), so it cannot pass for a real one.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from hvdtrain import task as TK
from hvdtrain.batch import Batch
from hvdtrain.config import derive_seed

DEFAULT_CLASSES = 1000   # --data.num_classes=0 with synthetic data: ImageNet's class count
POOL_BATCHES = 4         # micro-batches made per rank and cycled: 4 x a batch's memory on the device


@dataclass
class SyntheticData:
    """Stands where `data.shards.ShardSet` stands in a run (`session.open_data`): the
    classes, a fingerprint and a description, and no files."""
    batch_size: int
    views: int
    size: int
    num_classes: int
    seed: int
    ranks: int
    spec: str = "synthetic (no reader)"
    classes: list | None = None     # no class names
    is_remote: bool = False         # no bucket either
    info_path: str | None = None
    shuffled: bool = True
    unlabeled: int = 0
    paths: list = field(default_factory=list)

    @property
    def fingerprint(self) -> str:
        return (f"synthetic-{self.batch_size}x{self.views}x3x{self.size}x{self.size}-c{self.num_classes}"
                f"-seed{self.seed}")

    @property
    def total(self) -> int:
        return POOL_BATCHES * self.batch_size * self.ranks

    def describe(self) -> dict:
        return {"spec": self.spec, "synthetic": True, "shards": 0, "first": None, "last": None,
                "samples": self.total, "num_classes": self.num_classes, "fingerprint": self.fingerprint,
                "view_shape": [self.batch_size, 3, self.size, self.size], "views": self.views,
                "labels": f"uniform over {self.num_classes} classes, seed {self.seed}", "info": None, "indexes": {},
                "banner": self.banner_line()}

    def banner_line(self) -> str:
        return (f"SYNTHETIC, no reader: {self.views} view(s) of {self.batch_size}x3x{self.size}x{self.size} "
                f"random images per micro-batch, labels uniform over {self.num_classes} classes (seed {self.seed}); "
                f"fingerprint {self.fingerprint}")


def open_data(cfg, ranks: int) -> tuple[SyntheticData, None, dict]:
    """(train, val, description) as `data.dataset.open_data` returns them: no val."""
    train = SyntheticData(cfg.train.batch_size, TK.get(cfg.train.task).views, cfg.data.size,
                          cfg.data.num_classes or DEFAULT_CLASSES, cfg.seed, ranks)
    return train, None, {"train": train.describe()}


def source_rows(names: list[str]) -> torch.Tensor:
    """Names as the [B, L] uint8 rows `Batch.sources` holds (0-padded)."""
    raw = [n.encode() for n in names]
    out = torch.zeros(len(raw), max(len(r) for r in raw), dtype=torch.uint8)
    for i, r in enumerate(raw):
        out[i, :len(r)] = torch.frombuffer(bytearray(r), dtype=torch.uint8)
    return out


class InMemoryLoader:
    """Cycles through batches already in memory (the `Loader` protocol of hvdtrain.loader):
    the loop's input with no data work."""

    def __init__(self, batches: list[Batch]):
        self.batches, self.epoch, self.last_source = batches, 0, "(in memory)"

    def epoch_batches(self) -> Iterator[Batch]:
        for b in self.batches:
            self.last_source = b.source(b.sources.shape[0] - 1)
            yield b
        self.epoch += 1

    def forever(self) -> Iterator[Batch]:
        while True:
            yield from self.epoch_batches()

    def checkpoint(self) -> None:
        return None

    def describe(self) -> str:
        return f"in memory ({len(self.batches)} batches)"


class SyntheticLoader(InMemoryLoader):
    """`POOL_BATCHES` random micro-batches of the config's shapes, made once on `device`."""

    def __init__(self, cfg, num_classes: int | None, rank: int = 0, device: torch.device | None = None):
        device = device or torch.device("cpu")
        views, b, s = TK.get(cfg.train.task).views, cfg.train.batch_size, cfg.data.size
        k = num_classes or cfg.data.num_classes or DEFAULT_CLASSES
        seed = derive_seed(cfg.seed, "synthetic", rank)
        images = torch.Generator(device=device).manual_seed(seed)
        labels = torch.Generator().manual_seed(seed)  # on the host: the same labels on any device
        fmt = torch.channels_last if cfg.data.channels_last else torch.contiguous_format
        batches = []
        for i in range(POOL_BATCHES):
            vs = [torch.randn(b, 3, s, s, generator=images, device=device).contiguous(memory_format=fmt)
                  for _ in range(views)]
            y = torch.randint(0, k, (b,), generator=labels).to(device)
            batches.append(Batch(vs, y, source_rows([f"synthetic:rank{rank}-batch{i}:sample{j}" for j in range(b)])))
        super().__init__(batches)
        self.device, self.shape, self.views = device, (b, 3, s, s), views

    def describe(self) -> str:
        b, c, h, w = self.shape
        return (f"SYNTHETIC batches made on {self.device} ({POOL_BATCHES} micro-batches of {self.views} view(s) "
                f"{b}x{c}x{h}x{w}, cycled; no reader, no decode)")
