"""The loader room: what the training loop consumes, behind one interface.

    loader = from_config(cfg, shards, "train", threads=dali_threads)   # the one factory
    for batch in loader.forever(): ...                                 # Batch objects

Every loader (`Loader`) yields `Batch` objects, counts epochs, remembers which shard
member its last batch came from (so a data error can name it) and can checkpoint its
position. `DaliLoader` turns DALI outputs into torch tensors and integer labels;
`TorchLoader` (hvdtrain/torch_loader.py, `--data.loader=torch`) is the DataLoader + PIL
baseline behind the same loop; `SyntheticLoader` (hvdtrain/synthetic.py,
`--data.loader=synthetic`) cycles random batches of the same shapes made on the device,
with no reader (the "no data work" reference). To change what a loader does, change the
`PipeSpec` that `pipeline.spec_from_config` builds and the code that reads it.
"""
from __future__ import annotations

import atexit
import dataclasses
import math
import os
import shutil
import tempfile
import threading
import time
from typing import Iterator, Protocol

import numpy as np

import torch

from data.shards import ShardSet
from data.tarindex import ShardError
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
        self.shards, self.spec, self.num_classes = shards, spec, num_classes
        self.device, self.dtype, self.channels_last = device or torch.device("cpu"), dtype, channels_last
        self.names = pipeline.output_names(spec)
        self.epoch, self.drop_last = epoch, drop_last
        self.last_source = "(no batch read yet)"
        self._scratch = self._next_epoch = self._static = None
        self._taken = 0  # batches handed out in this epoch
        self._build_s, self._batch_s, self._t_last = 0.0, 0.0, None  # measured: when to build the next epoch
        self.pipe, self._it, self._slice = self._make(epoch, checkpoint)

    def _make(self, epoch: int, checkpoint: bytes | None = None):
        """(pipeline, iterator, view) for `epoch`: this rank's view of the shards
        (`data.dataset.rank_view`: only its samples' index entries), read as DALI's only
        shard; with shard_shuffle, that epoch's interleaved view with a seed of its own
        (else every epoch would replay the same crops)."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        t0 = time.monotonic()
        spec = dataclasses.replace(self.spec, shard_id=0, num_shards=1)
        if spec.shard_shuffle:
            spec.seed = epoch_seed(spec.seed, epoch)
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        view = None
        try:  # DALI reads the index and prefetches the first batches here: errors start here too
            view = self._view(epoch)
            pipe = pipeline.build(view, spec, checkpoint)
            it = DALIGenericIterator([pipe], self.names, reader_name="Reader", last_batch_policy=policy,
                                     auto_reset=False)
        except (RuntimeError, ShardError) as e:
            raise self._data_error(e, "could not start reading", view, epoch) from e
        self._build_s = time.monotonic() - t0
        return pipe, it, view

    def _view(self, epoch: int) -> ShardSet:
        """This rank's view: built once (its slice of the tars in order), or per epoch
        (shard_shuffle: its slice of the epoch's chunks)."""
        from data.dataset import rank_view

        s = self.spec
        if not s.shard_shuffle and self._static is not None:
            return self._static
        if self._scratch is None:
            self._scratch = tempfile.mkdtemp(prefix=f"hvdtrain-view-r{s.shard_id}-")
            atexit.register(shutil.rmtree, self._scratch, True)
        if not s.shard_shuffle:
            self._static = rank_view(self.shards, s.shard_id, s.num_shards, os.path.join(self._scratch, "view"),
                                     pad=self.drop_last)
            return self._static
        view = rank_view(self.shards, s.shard_id, s.num_shards, os.path.join(self._scratch, f"epoch-{epoch}"),
                         pad=self.drop_last, epoch=epoch, seed=s.order_seed, chunk=s.interleave_chunk)
        # two epochs back: its pipeline read its indexes when it was built, and is gone
        shutil.rmtree(os.path.join(self._scratch, f"epoch-{epoch - 2}"), ignore_errors=True)
        return view

    def _prepare_next_epoch(self) -> None:
        """shard_shuffle: build the next epoch's pipeline in a thread while this epoch's last
        batches are consumed, so its first batches are ready at the boundary (DALI runs
        the build and the prefetch in its own threads)."""
        box: dict = {}

        def work():
            try:
                box["made"] = self._make(self.epoch + 1)
            except BaseException as e:  # noqa: BLE001 - re-raised at the boundary, in the loop's thread
                box["error"] = e
        t = threading.Thread(target=work, name="hvdtrain-next-epoch", daemon=True)
        t.start()
        self._next_epoch = (t, box)

    def _start_next_epoch(self) -> None:
        if self.spec.shard_shuffle:
            if self._next_epoch is None:
                self._prepare_next_epoch()
            t, box = self._next_epoch
            t.join()
            self._next_epoch = None
            if "error" in box:
                raise box["error"]
            self.pipe = self._it = None  # the old pipeline and its threads go first
            self.pipe, self._it, self._slice = box["made"]
        elif not self.drop_last and self.spec.random_crop_flip:
            self.pipe = self._it = None  # a val pass with random views: the same views every pass
            self.pipe, self._it, self._slice = self._make(self.epoch)
        else:
            self._it.reset()

    def close(self) -> None:
        """Wait for the next epoch's pipeline a background thread may be building
        (shard_shuffle), then drop every pipeline this loader holds (`Run.release_loaders`)."""
        if self._next_epoch is not None:
            thread, box = self._next_epoch
            thread.join()
            box.clear()
            self._next_epoch = None
        self.pipe = self._it = None

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
        labels = parse_labels(out["labels"].cpu(), sources, optional=self.spec.labels_optional)
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

    def _data_error(self, e: BaseException, what: str, sliced: ShardSet | None = None,
                    epoch: int | None = None) -> DataError:
        """DALI's error does not name the sample: scan this rank's part of the data for it
        (with shard_shuffle: the epoch's slice, `sliced`, default the current one)."""
        from data import verify

        sliced = sliced or getattr(self, "_slice", None) or self.shards
        epoch = self.epoch if epoch is None else epoch
        found, complete = verify.locate_indexed(sliced, self.num_classes)
        whose = f"rank {self.spec.shard_id}'s samples" + (f" of epoch {epoch}" if self.spec.shard_shuffle else "")
        if found:
            more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
            where = f" A scan of {whose} found: " + "; ".join(str(p) for p in found[:3]) + more + "."
        else:
            where = f" A scan of {whose} found no bad sample" + ("." if complete else " in its time budget.")
        return DataError(f"DALI {what} {self.shards.spec} (rank {self.spec.shard_id}, epoch {epoch}; the "
                         f"last good batch ended at {self.last_source}): {dali_reason(e)}.{where} List every "
                         f"problem with `python -m data.verify {self.shards.spec}`, or train past bad samples "
                         f"with --data.on_error=skip")

    def epoch_batches(self):
        """The rest of this epoch on this rank."""
        while True:
            if self.spec.shard_shuffle and self._next_epoch is None and self._taken >= len(self) - self._lead():
                self._prepare_next_epoch()
            try:
                out = self._next()
            except StopIteration:
                self._start_next_epoch()
                self.epoch += 1
                self._taken, self._t_last = 0, None
                return
            self._taken += 1
            now = time.monotonic()  # batch to batch, the training step included
            if self._t_last is not None:
                dt = now - self._t_last
                self._batch_s = 0.9 * self._batch_s + 0.1 * dt if self._batch_s else dt
            self._t_last = now
            yield self._convert(out)

    def _lead(self) -> int:
        """Batches before the boundary at which the next epoch's pipeline is built: twice its
        measured build time in batches (at least 2), so it is ready when the epoch ends."""
        if not self._batch_s:
            return 2
        return max(2, min(len(self) - 1, math.ceil(2 * self._build_s / self._batch_s) + 1))

    def forever(self):
        """Batches across epochs, for step-based training."""
        while True:
            yield from self.epoch_batches()


def epoch_seed(seed: int, epoch: int) -> int:
    """The DALI seed of a rebuilt epoch: the rank's seed for epoch 0, an independent one after."""
    if epoch == 0:
        return seed
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0]) & 0x7FFFFFFF


def from_config(cfg, shards: ShardSet, split: str = "train", threads: int = 1, checkpoint=None,
                epoch: int = 0) -> Loader:
    """The loader `cfg` asks for on this rank: shard_id = global rank, device_id = local
    rank. split="val": the whole set once per pass, partial last batch kept.
    `--data.loader=synthetic`: `shards` is hvdtrain.synthetic's stand-in, and there is no val."""
    from hvdtrain import dist

    if cfg.data.loader == "synthetic":
        from hvdtrain.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, shards.num_classes, dist.rank(), dist.device())
    gpu = torch.cuda.is_available()
    spec = pipeline.spec_from_config(cfg, split, rank=dist.rank(), size=dist.size(),
                                     device_id=dist.local_rank() if gpu else None, threads=threads,
                                     written_shuffled=shards.shuffled, labels_optional=bool(shards.unlabeled))
    kw = dict(num_classes=shards.num_classes, device=dist.device(), channels_last=cfg.data.channels_last,
              drop_last=split == "train", checkpoint=checkpoint, epoch=epoch)
    if cfg.data.loader == "torch":
        from hvdtrain.torch_loader import TorchLoader

        return TorchLoader(shards, spec, **kw)
    return DaliLoader(shards, spec, **kw)
