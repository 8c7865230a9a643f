"""The iterator the training loop consumes, and the torch DataLoader baseline.

`DaliLoader` turns DALI outputs into torch tensors and integer labels, counts epochs,
and remembers which shard member the last batch came from, so a data error can name
it. `TorchLoader` is the baseline for `bench.loader`: webdataset + PIL + DataLoader
workers doing the same random-resized crop, flip and normalize.
"""
from __future__ import annotations

import io
import math
import os
import random
from dataclasses import dataclass

import numpy as np
import torch

from data.wds import ShardSet
from hvdtrain import pipeline
from hvdtrain.pipeline import MEAN, STD, PipeSpec


class DataError(RuntimeError):
    """Bad input found while training; the message names the shard and sample."""


@dataclass
class Batch:
    views: list[torch.Tensor]   # each [B, 3, H, W] float32, normalized
    labels: torch.Tensor        # [B] int64
    sources: torch.Tensor       # [B, L] uint8: "tar:offset:member" per sample, 0-padded

    def source(self, i: int) -> str:
        return decode_source(self.sources[i])

    def keys(self) -> list[str]:
        """Sample member names (`<key>.<ext>`), for tests and error messages."""
        return [self.source(i).rsplit(":", 1)[-1] for i in range(self.sources.shape[0])]


def dali_reason(e: BaseException) -> str:
    """The informative line of a DALI error: the one after "encountered:", else the first."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else repr(e)


def decode_source(row: torch.Tensor) -> str:
    return bytes(row.numpy()).rstrip(b"\0").decode(errors="replace")


_DIGIT0, _DIGIT9 = ord("0"), ord("9")
_SPACE = torch.tensor([0, 9, 10, 13, 32], dtype=torch.uint8)  # pad, tab, LF, CR, space


def parse_labels(raw: torch.Tensor, sources: torch.Tensor | None = None) -> torch.Tensor:
    """ASCII-decimal `.cls` bytes, padded to [B, W] with zeros -> int64 [B].

    Vectorised; raises DataError naming the sample when a label has a non-digit byte,
    no digits at all, or fills the whole padded width (it may have been cut off).
    """
    raw = raw.to(torch.int64)
    digit = (raw >= _DIGIT0) & (raw <= _DIGIT9)
    space = torch.isin(raw, _SPACE.to(torch.int64))
    bad = ~(digit | space).all(dim=1) | ~digit.any(dim=1) | (raw[:, -1] != 0)
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        where = decode_source(sources[i]) if sources is not None else f"batch row {i}"
        text = bytes(raw[i].to(torch.uint8).numpy()).rstrip(b"\0")
        raise DataError(f"{where}: label {text!r} is not a decimal class index "
                        f"(.cls must be ASCII digits, at most {raw.shape[1] - 1} bytes)")
    value = torch.zeros(raw.shape[0], dtype=torch.int64)
    for j in range(raw.shape[1]):  # W=16 columns: cheap next to decoding a batch
        d = digit[:, j]
        value = torch.where(d, value * 10 + (raw[:, j] - _DIGIT0), value)
    return value


class DaliLoader:
    """Batches from a DALI pipeline over shards; epochs end when the reader wraps.

    With `pad_last_batch=True` and LastBatchPolicy.DROP (train) every rank sees the same
    number of batches per epoch: unequal counts would leave a Horovod collective waiting.
    """

    def __init__(self, shards: ShardSet, spec: PipeSpec, num_classes: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, drop_last: bool | None = None,
                 checkpoint: bytes | None = None, epoch: int = 0):
        """`device`, `dtype`, `channels_last`: where and how views arrive (normalize=kernel:
        uint8 crops are moved there first, then normalized by kernels.normalize).
        `drop_last`: drop the partial last batch (default: spec.train). `checkpoint`,
        `epoch`: resume from a `checkpoint()` taken mid-epoch."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.shards, self.spec, self.num_classes = shards, spec, num_classes
        self.device, self.dtype, self.channels_last = device or torch.device("cpu"), dtype, channels_last
        self._mean, self._std = torch.tensor(MEAN), torch.tensor(STD)
        self.names = pipeline.output_names(spec)
        self.epoch = epoch
        self.last_source = "(no batch read yet)"
        drop = spec.train if drop_last is None else drop_last
        policy = LastBatchPolicy.DROP if drop else LastBatchPolicy.PARTIAL
        try:  # DALI reads the index and prefetches the first batches here: errors start here too
            self.pipe = pipeline.build(shards, spec, checkpoint)
            self._it = DALIGenericIterator([self.pipe], self.names, reader_name="Reader",
                                           last_batch_policy=policy, auto_reset=False)
        except RuntimeError as e:
            raise self._data_error(e, "could not start reading") from e

    def checkpoint(self) -> bytes:
        """The reader position and random states after the last batch handed out (the
        iterator accounts for batches DALI has prefetched but we have not consumed)."""
        return self._it.checkpoints()[0]

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._it)

    def _convert(self, out: dict) -> Batch:
        sources = out["source"]
        labels = parse_labels(out["labels"].cpu(), sources)
        if self.num_classes is not None and labels.numel():
            lo, hi = int(labels.min()), int(labels.max())
            if lo < 0 or hi >= self.num_classes:
                i = int(((labels < 0) | (labels >= self.num_classes)).nonzero()[0, 0])
                raise DataError(f"{decode_source(sources[i])}: label {int(labels[i])} out of range "
                                f"[0, {self.num_classes}) for {self.shards.spec}")
        views = [out[n] for n in self.names if n.startswith("view")]
        if self.spec.normalize == "kernel":
            views = [self._normalize(v, out.get(f"flip{i}")) for i, v in enumerate(views)]
        batch = Batch(views, labels, sources)
        self.last_source = decode_source(sources[-1])
        return batch

    def _normalize(self, v: torch.Tensor, flip: torch.Tensor | None) -> torch.Tensor:
        """uint8 NHWC -> normalized NCHW on the target device (Triton on CUDA, torch elsewhere)."""
        from kernels.normalize import normalize

        v = v.to(self.device, non_blocking=True)  # uint8: a quarter of float32's PCIe bytes
        if flip is not None:
            flip = flip.view(-1).to(self.device, non_blocking=True).bool()
        return normalize(v, self._mean, self._std, flip, self.dtype, self.channels_last)

    def _next(self) -> dict:
        try:
            return next(self._it)[0]
        except StopIteration:
            raise
        except RuntimeError as e:
            raise self._data_error(e, "stopped reading") from e

    def _data_error(self, e: RuntimeError, what: str) -> DataError:
        """DALI's error does not name the sample: scan this rank's part of the data for it."""
        from data import verify

        found, complete = verify.locate(self.shards, self.spec.shard_id, self.spec.num_shards, self.num_classes)
        if found:
            more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
            where = (f" A scan of rank {self.spec.shard_id}'s samples found: "
                     + "; ".join(str(p) for p in found[:3]) + more + ".")
        else:
            where = f" A scan of rank {self.spec.shard_id}'s samples found no bad sample" + (
                "." if complete else " in its time budget.")
        return DataError(f"DALI {what} {self.shards.spec} (rank {self.spec.shard_id}, epoch {self.epoch}; the "
                         f"last good batch ended at {self.last_source}): {dali_reason(e)}.{where} List every "
                         f"problem with `python -m data.verify {self.shards.spec}`, or train past bad samples "
                         f"with --data.on_error=skip")

    def epoch_batches(self):
        """One epoch of batches on this rank."""
        while True:
            try:
                out = self._next()
            except StopIteration:
                self._it.reset()
                self.epoch += 1
                return
            yield self._convert(out)

    def forever(self):
        """Batches across epochs, for step-based training."""
        while True:
            yield from self.epoch_batches()


# ---------------------------------------------------------------- torch baseline
def random_resized_crop_box(w: int, h: int, min_scale: float, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters (scale (min_scale, 1), ratio 3/4..4/3)."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, x + cw, y + ch
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


class _PilAugment:
    def __init__(self, size: int, min_scale: float, seed: int):
        self.size, self.min_scale, self.seed = size, min_scale, seed
        self.rng, self._pid = random.Random(seed), os.getpid()
        self.mean = np.array(MEAN, dtype=np.float32)
        self.std = np.array(STD, dtype=np.float32)

    def __call__(self, sample: dict) -> tuple[torch.Tensor, int]:
        from PIL import Image, ImageOps

        if os.getpid() != self._pid:  # a DataLoader worker: its own random stream
            info = torch.utils.data.get_worker_info()
            self.rng, self._pid = random.Random(self.seed * 1000 + (info.id if info else 0)), os.getpid()
        data = next(v for k, v in sample.items() if k.lower() in ("jpg", "jpeg", "png"))
        with Image.open(io.BytesIO(data)) as im:
            im = ImageOps.exif_transpose(im).convert("RGB")  # as displayed: DALI's decoders apply EXIF too
            box = random_resized_crop_box(im.width, im.height, self.min_scale, self.rng)
            im = im.resize((self.size, self.size), Image.BILINEAR, box=box)
        arr = np.asarray(im, dtype=np.float32)
        if self.rng.random() < 0.5:
            arr = arr[:, ::-1]
        arr = (arr - self.mean) / self.std
        return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))), int(sample["cls"])


class TorchLoader:
    """webdataset + PIL + torch DataLoader: the baseline every DALI figure is set beside."""

    def __init__(self, shards: ShardSet, batch_size: int, workers: int, size: int,
                 min_scale: float = 0.25, seed: int = 0):
        import webdataset as wds

        aug = _PilAugment(size, min_scale, seed)
        ds = (wds.WebDataset(shards.paths, shardshuffle=False, empty_check=False,
                             workersplitter=wds.split_by_worker, nodesplitter=None)
              .map(aug))
        self.loader = torch.utils.data.DataLoader(
            ds, batch_size=batch_size, num_workers=workers, drop_last=True,
            persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None)

    def forever(self):
        while True:
            yield from self.loader
