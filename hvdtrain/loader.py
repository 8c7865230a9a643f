"""The loader room: what the training loop consumes, behind one interface.

    loader = from_config(cfg, shards, "train", threads=dali_threads)   # the one factory
    for batch in loader.forever(): ...                                 # Batch objects

Every loader (`Loader`) yields `Batch` objects, counts epochs, remembers which shard
member its last batch came from (so a data error can name it) and can checkpoint its
position. `DaliLoader` turns DALI outputs into torch tensors and integer labels;
`TorchLoader` (hvdtrain/torch_loader.py, `--data.loader=torch`) is the DataLoader + PIL
baseline behind the same loop; `InMemoryLoader` cycles batches already in memory
(`bench.train`'s "no data work" reference). To change what a loader does, change the
`PipeSpec` that `pipeline.spec_from_config` builds and the code that reads it.
"""
from __future__ import annotations

import itertools
from typing import Iterator, Protocol

import torch

from data.wds import ShardSet
from hvdtrain import pipeline
from hvdtrain.batch import (Batch, DataError, check_label_range, dali_reason, decode_source,  # noqa: F401
                            parse_labels, to_model_input)
from hvdtrain.pipeline import PipeSpec


class Loader(Protocol):
    """What the loop, the val pass and checkpoints ask of a loader."""
    epoch: int                  # epochs finished on this rank
    last_source: str            # "tar:offset:member" of the last sample handed out

    def epoch_batches(self) -> Iterator[Batch]: ...   # one epoch on this rank, then epoch += 1
    def forever(self) -> Iterator[Batch]: ...         # epochs back to back (step-based training)
    def checkpoint(self) -> bytes | None: ...         # position after the last batch handed out
    def describe(self) -> str: ...                    # one line for banners and reports


class DaliLoader:
    """Batches from a DALI pipeline over shards; epochs end when the reader wraps.

    With `pad_last_batch=True` and LastBatchPolicy.DROP (train) every rank sees the same
    number of batches per epoch: unequal counts would leave a Horovod collective waiting.
    """

    def __init__(self, shards: ShardSet, spec: PipeSpec, num_classes: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, drop_last: bool = True,
                 checkpoint: bytes | None = None, epoch: int = 0):
        """`device`, `dtype`, `channels_last`: where and how views arrive (normalize=kernel:
        uint8 crops are moved there first, then normalized by kernels.normalize).
        `drop_last`: drop the partial last batch (training); False keeps it (a val pass
        counts every sample). `checkpoint`, `epoch`: resume from a `checkpoint()` taken
        mid-epoch."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        self.shards, self.spec, self.num_classes = shards, spec, num_classes
        self.device, self.dtype, self.channels_last = device or torch.device("cpu"), dtype, channels_last
        self.names = pipeline.output_names(spec)
        self.epoch = epoch
        self.last_source = "(no batch read yet)"
        policy = LastBatchPolicy.DROP if drop_last else LastBatchPolicy.PARTIAL
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

    def describe(self) -> str:
        return f"DALI decode {self.spec.decode}, normalize {self.spec.normalize}"

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        return len(self._it)

    def _convert(self, out: dict) -> Batch:
        sources = out["source"]
        labels = parse_labels(out["labels"].cpu(), sources)
        check_label_range(labels, sources, self.num_classes, self.shards.spec)
        views = [out[n] for n in self.names if n.startswith("view")]
        if self.spec.normalize == "kernel":
            views = [to_model_input(v, out.get(f"flip{i}"), self.device, self.dtype, self.channels_last)
                     for i, v in enumerate(views)]
        batch = Batch(views, labels, sources)
        self.last_source = decode_source(sources[-1])
        return batch

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


class InMemoryLoader:
    """Cycles through batches already in memory: the loop's input with no data work
    (`bench.train`'s synthetic reference: same shapes, dtypes and devices as real ones)."""

    def __init__(self, batches: list[Batch]):
        self.batches, self.epoch, self.last_source = batches, 0, "(synthetic, in memory)"

    def epoch_batches(self) -> Iterator[Batch]:
        yield from self.batches
        self.epoch += 1

    def forever(self) -> Iterator[Batch]:
        return itertools.cycle(self.batches)

    def checkpoint(self) -> None:
        return None

    def describe(self) -> str:
        return f"in memory ({len(self.batches)} batches)"


def from_config(cfg, shards: ShardSet, split: str = "train", threads: int = 1, checkpoint=None,
                epoch: int = 0) -> Loader:
    """The loader `cfg` asks for on this rank: shard_id = global rank, device_id = local
    rank. split="val": the whole set once per pass, partial last batch kept."""
    from hvdtrain import dist

    gpu = torch.cuda.is_available()
    spec = pipeline.spec_from_config(cfg, split, rank=dist.rank(), size=dist.size(),
                                     device_id=dist.local_rank() if gpu else None, threads=threads)
    kw = dict(num_classes=shards.num_classes, device=dist.device(), channels_last=cfg.data.channels_last,
              drop_last=split == "train", checkpoint=checkpoint, epoch=epoch)
    if cfg.data.loader == "torch":
        from hvdtrain.torch_loader import TorchLoader

        return TorchLoader(shards, spec, **kw)
    return DaliLoader(shards, spec, **kw)
