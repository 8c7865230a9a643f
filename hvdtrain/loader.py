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

import base64
import dataclasses
import json
import math
import threading
import time
from typing import Iterator, Protocol

import numpy as np

import torch

from hvdtrain.data.shards import ShardSet
from hvdtrain.data.tarindex import ShardError
from hvdtrain import pipeline
from hvdtrain.batch import (Batch, DataError, check_label_range, dali_reason, decode_source,  # noqa: F401
                            parse_labels, to_model_input)
from hvdtrain.pipeline import PipeSpec
from hvdtrain.reading import Reading


class Loader(Protocol):
    """What the loop, the val pass and checkpoints ask of a loader."""
    epoch: int                  # epochs finished on this rank
    last_source: str            # "tar:offset:member" of the last sample handed out

    def epoch_batches(self) -> Iterator[Batch]: ...   # one epoch on this rank, then epoch += 1
    def forever(self) -> Iterator[Batch]: ...         # epochs back to back (step-based training)
    def checkpoint(self) -> bytes | None: ...         # position after the last batch handed out
    def describe(self) -> str: ...                    # one line for banners and reports


class DaliLoader:
    """Batches from DALI pipelines over shards; epochs end when the last part's reader wraps.

    A rank's epoch is one part (one pipeline per epoch) or several windows (one pipeline
    each, over shards already on local disk: `hvdtrain.reading`). The next part's pipeline
    is built in a background thread while this part's last batches are consumed. With
    `pad_last_batch=True` and LastBatchPolicy.DROP (train), and windows of whole batches,
    every rank sees the same number of batches per epoch: unequal counts would leave a
    Horovod collective waiting.
    """

    def __init__(self, shards: ShardSet, spec: PipeSpec, num_classes: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, drop_last: bool = True,
                 checkpoint: bytes | None = None, epoch: int = 0, log=None):
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
        self.plan = Reading(shards, spec, drop_last, "train" if drop_last else "val", log)
        self._next = None   # (thread, box) building the next part's pipeline
        self._taken = 0     # batches handed out from the current part
        self._build_s, self._batch_s, self._t_last = 0.0, 0.0, None  # measured: when to build the next part
        w, dali = self._restore(checkpoint, epoch)
        self._part = self._make(epoch, w, dali)

    # ---------------------------------------------------------------- parts and pipelines
    def _restore(self, checkpoint: bytes | None, epoch: int) -> tuple[int, bytes | None]:
        """(window, DALI state) from a `checkpoint()`: windowed loaders wrap DALI's state
        with the window it belongs to."""
        if checkpoint is None:
            return 0, None
        windowed = checkpoint[:1] == b"{"
        if windowed != self.plan.windowed:
            print(f"warning: the checkpoint's reader state is for {'windowed' if windowed else 'whole-epoch'} "
                  f"reading, this run reads {'windows' if self.plan.windowed else 'whole epochs'}: the reader "
                  f"restarts epoch {epoch} from its start", flush=True)
            return 0, None
        if not windowed:
            return 0, checkpoint
        state = json.loads(checkpoint)
        if state.get("kind") != WINDOW_STATE or state["epoch"] != epoch:
            raise ValueError(f"not a windowed DALI reader state of epoch {epoch}: {str(state)[:80]}")
        return state["window"], base64.b64decode(state["dali"])

    def _make(self, epoch: int, w: int, checkpoint: bytes | None = None) -> dict:
        """Part `w` of `epoch`: its view (local files: fetched first for bucket data), the
        pipeline over it (its own seed with shard_shuffle or windows, else every epoch
        would replay the same crops) and the iterator."""
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        t0 = time.monotonic()
        spec = dataclasses.replace(self.spec, shard_id=0, num_shards=1)
        if self.plan.per_epoch:
            spec.seed = part_seed(spec.seed, epoch, w)
        policy = LastBatchPolicy.DROP if self.drop_last else LastBatchPolicy.PARTIAL
        view = local = None
        try:  # DALI reads the index and prefetches the first batches here: errors start here too
            view = self.plan.parts(epoch)[w]
            self.plan.announce(epoch, w)
            local = self.plan.local(view)
            pipe = pipeline.build(local, spec, checkpoint)
            it = DALIGenericIterator([pipe], self.names, reader_name="Reader", last_batch_policy=policy,
                                     auto_reset=False)
        except (RuntimeError, ShardError) as e:
            self.plan.release(local)
            raise self._data_error(e, "could not start reading", local or view, epoch) from e
        self._build_s = time.monotonic() - t0
        return {"pipe": pipe, "it": it, "view": view, "local": local, "epoch": epoch, "w": w}

    @property
    def pipe(self):
        return self._part["pipe"] if self._part else None

    def _following(self) -> tuple[int, int]:
        e, w = self._part["epoch"], self._part["w"]
        return (e, w + 1) if w + 1 < len(self.plan.parts(e)) else (e + 1, 0)

    def _prepare_next(self) -> None:
        """Build the next part's pipeline in a thread while this part's last batches are
        consumed, so its first batches are ready at the boundary (DALI runs the build and
        the prefetch in its own threads; bucket data is fetched by the node's fetcher)."""
        box: dict = {}
        e, w = self._following()

        def work():
            try:
                box["made"] = self._make(e, w)
            except BaseException as err:  # noqa: BLE001 - re-raised at the boundary, in the loop's thread
                box["error"] = err
        t = threading.Thread(target=work, name="hvdtrain-next-part", daemon=True)
        t.start()
        self._next = (t, box)

    def _switch(self) -> None:
        """The current part is read: the next one takes its place."""
        if not self.plan.per_epoch:
            if not self.drop_last and self.spec.random_crop_flip:
                self._drop_part()  # a val pass with random views: the same views every pass
                self._part = self._make(self.epoch, 0)
            else:
                self._part["it"].reset()
            return
        if self._next is None:
            self._prepare_next()
        t, box = self._next
        t.join()
        self._next = None
        if "error" in box:
            raise box["error"]
        self._drop_part()  # the old pipeline and its threads go first
        self._part = box["made"]

    def _drop_part(self) -> None:
        if self._part is not None:
            local = self._part["local"]
            self._part = None
            self.plan.release(local)

    def close(self) -> None:
        """Wait for the next part's pipeline a background thread may be building, then
        drop every pipeline this loader holds (`Run.release_loaders`)."""
        if self._next is not None:
            thread, box = self._next
            thread.join()
            if "made" in box:
                self.plan.release(box["made"]["local"])
            box.clear()
            self._next = None
        self._drop_part()
        self.plan.close()

    def checkpoint(self) -> bytes:
        """The reader position and random states after the last batch handed out (the
        iterator accounts for batches DALI has prefetched but the loader has not handed out);
        windowed: with the window it belongs to."""
        dali = self._part["it"].checkpoints()[0]
        if not self.plan.windowed:
            return dali
        return json.dumps({"kind": WINDOW_STATE, "epoch": self._part["epoch"], "window": self._part["w"],
                           "dali": base64.b64encode(dali).decode()}).encode()

    def describe(self) -> str:
        where = ""
        if self.plan.windowed:
            where = f", windows of {self.plan.window} samples ({self.spec.window_shards} shards)"
        if self.shards.is_remote:
            where += f", bucket data {'through the node cache: ' + self.plan.cache.describe() if self.plan.cache else 'read directly by DALI'}"
        return f"DALI decode {self.spec.decode}, normalize {self.spec.normalize}{where}"

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if not self.plan.per_epoch:
            return len(self._part["it"])
        return self.plan.epoch_batches(self.epoch)

    def _convert(self, out: dict) -> Batch:
        sources = out["source"]
        try:
            labels = parse_labels(out["labels"].cpu(), sources, optional=self.spec.labels_optional)
            check_label_range(labels, sources, self.num_classes, self.shards.spec)
        except DataError as e:
            raise DataError(self.plan.url_of(str(e))) from None
        views = [out[n] for n in self.names if n.startswith("view")]
        if self.spec.normalize == "kernel":
            views = [to_model_input(v, out.get(f"flip{i}"), self.device, self.dtype, self.channels_last)
                     for i, v in enumerate(views)]
        batch = Batch(views, labels, sources)
        self.last_source = self.plan.url_of(decode_source(sources[-1]))
        return batch

    def _next_out(self) -> dict:
        try:
            return next(self._part["it"])[0]
        except StopIteration:
            raise
        except RuntimeError as e:
            raise self._data_error(e, "stopped reading") from e

    def _data_error(self, e: BaseException, what: str, sliced: ShardSet | None = None,
                    epoch: int | None = None) -> DataError:
        """DALI's error does not name the sample: scan this rank's part of the data for it
        (the part being read, default the current one). A remote fetch that failed is
        named as it is."""
        from hvdtrain.data import verify
        from hvdtrain.data.remote import RemoteError, is_remote

        epoch = self.epoch if epoch is None else epoch
        if isinstance(e, RemoteError):
            return DataError(f"{self.shards.spec} (rank {self.spec.shard_id}, epoch {epoch}): {e}")
        sliced = sliced or (self._part or {}).get("local") or self.shards
        if any(is_remote(p) for p in sliced.paths):
            found, complete = [], False  # direct reading: not scanned over the network
        else:
            found, complete = verify.locate_indexed(sliced, self.num_classes)
        whose = f"rank {self.spec.shard_id}'s samples" + (f" of epoch {epoch}" if self.plan.per_epoch else "")
        if found:
            more = f" (and {len(found) - 3} more)" if len(found) > 3 else ""
            where = f" A scan of {whose} found: " + "; ".join(str(p) for p in found[:3]) + more + "."
        else:
            where = f" A scan of {whose} found no bad sample" + ("." if complete else " in its time budget.")
        return DataError(self.plan.url_of(
            f"DALI {what} {self.shards.spec} (rank {self.spec.shard_id}, epoch {epoch}; the last good batch ended "
            f"at {self.last_source}): {dali_reason(e)}.{where} List every problem with `python -m data.verify "
            f"{self.shards.spec}`, or train past bad samples with --data.on_error=skip"))

    def epoch_batches(self):
        """The rest of this epoch on this rank."""
        while True:
            if self.plan.per_epoch and self._next is None and self._taken >= len(self._part["it"]) - self._lead():
                self._prepare_next()
            try:
                out = self._next_out()
            except StopIteration:
                last = self._part["w"] + 1 >= len(self.plan.parts(self._part["epoch"]))
                self._switch()
                self._taken, self._t_last = 0, None
                if last:
                    self.epoch += 1
                    return
                continue
            self._taken += 1
            now = time.monotonic()  # batch to batch, the training step included
            if self._t_last is not None:
                dt = now - self._t_last
                self._batch_s = 0.9 * self._batch_s + 0.1 * dt if self._batch_s else dt
            self._t_last = now
            yield self._convert(out)

    def _lead(self) -> int:
        """Batches before the boundary at which the next part's pipeline is built: twice its
        measured build time in batches (at least 2), so it is ready when the part ends."""
        if not self._batch_s:
            return 2
        return max(2, min(len(self._part["it"]) - 1, math.ceil(2 * self._build_s / self._batch_s) + 1))

    def forever(self):
        """Batches across epochs, for step-based training."""
        while True:
            yield from self.epoch_batches()


WINDOW_STATE = "dali-window-v1"


def part_seed(seed: int, epoch: int, w: int = 0) -> int:
    """The DALI seed of a rebuilt part: the rank's seed for the first, an independent one
    after (window 0 of epoch e keeps the per-epoch seed interleaved reading always used)."""
    if w == 0:
        return epoch_seed(seed, epoch)
    return int(np.random.SeedSequence([seed, epoch, w]).generate_state(1)[0]) & 0x7FFFFFFF


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
    from hvdtrain import dist, logs

    if cfg.data.loader == "synthetic":
        from hvdtrain.synthetic import SyntheticLoader

        return SyntheticLoader(cfg, shards.num_classes, dist.rank(), dist.device())
    gpu = torch.cuda.is_available()
    spec = pipeline.spec_from_config(cfg, split, rank=dist.rank(), size=dist.size(),
                                     device_id=dist.local_rank() if gpu else None, threads=threads,
                                     written_shuffled=shards.shuffled, labels_optional=bool(shards.unlabeled),
                                     remote=shards.is_remote)
    kw = dict(num_classes=shards.num_classes, device=dist.device(), channels_last=cfg.data.channels_last,
              drop_last=split == "train", checkpoint=checkpoint, epoch=epoch)
    if cfg.data.loader == "torch":
        from hvdtrain.torch_loader import TorchLoader

        return TorchLoader(shards, spec, **kw)
    return DaliLoader(shards, spec, log=logs.say_here, **kw)
