"""What one rank reads, part by part, and where the bytes lie: the loaders' reading plan.

    plan = Reading(shards, spec, drop_last=True, channel="train")
    views = plan.parts(epoch)      # this rank's view of the epoch: one part, or windows
    local = plan.local(views[w])   # the same view over local files (bucket data: fetched, pinned)
    plan.release(local)            # the pipeline that read it is gone: unpinned

A part is a `ShardSet` whose indexes list only this rank's samples (`data.dataset`). Local
folders are read as one part per epoch (interleaved or not). Windowed reading
(`spec.window_shards` > 0: bucket data through the node cache by default, local data on
request) cuts the epoch into windows of about that many shards' samples, whole batches
each, so a reader is only ever given shards that are already on local disk (DALI opens
every path when its pipeline is built): the node's fetcher (`data.nodecache`) is told the
windows to come, in order, and fills the cache ahead of the reader. Remote reading changes
where the bytes come from, not which samples a step sees: a local copy read with the same
`--data.window_shards` gives the same batches.
"""
from __future__ import annotations

import atexit
import dataclasses
import itertools
import os
import shutil
import tempfile
import threading

from hvdtrain.data.dataset import rank_view, rank_windows, window_samples
from hvdtrain.data.shards import ShardSet

_READERS = itertools.count()


class Reading:
    def __init__(self, shards: ShardSet, spec, drop_last: bool, channel: str, log=None):
        self.shards, self.spec, self.drop_last = shards, spec, drop_last
        self.channel = f"{channel}-{next(_READERS)}"  # a process may hold several loaders (a bench: two ranks)
        self.windowed = spec.window_shards > 0
        self.window = window_samples(shards, spec.window_shards, spec.batch_size) if self.windowed else 0
        self.cache = None
        if shards.is_remote and shards.remote is not None and shards.remote.mode == "cache":
            from hvdtrain.data import nodecache

            self.cache = nodecache.get(shards.remote, log)
        elif shards.is_remote:
            from hvdtrain.data.remote import dali_environment

            dali_environment()  # DALI reads the bucket itself
        self._scratch = tempfile.mkdtemp(prefix=f"hvdtrain-view-r{spec.shard_id}-")
        atexit.register(shutil.rmtree, self._scratch, True)
        self._parts: dict[int, list[ShardSet]] = {}
        self._names: dict[str, str] = {}  # local copy -> URL, for messages
        self._lock = threading.Lock()     # parts are made by the loop and by the thread building the next part

    @property
    def per_epoch(self) -> bool:
        """A new view each epoch (interleaved, or windows): pipelines are rebuilt."""
        return self.spec.shard_shuffle or self.windowed

    def parts(self, epoch: int) -> list[ShardSet]:
        """This rank's parts of `epoch`, built once (kept for this epoch and the next)."""
        key = epoch if self.spec.shard_shuffle else 0  # an order of its own each epoch, or the same parts
        with self._lock:
            return self._parts_locked(key, epoch)

    def _parts_locked(self, key: int, epoch: int) -> list[ShardSet]:
        if key not in self._parts:
            s = self.spec
            interleave = dict(epoch=epoch, seed=s.order_seed, chunk=s.interleave_chunk) if s.shard_shuffle else {}
            out = os.path.join(self._scratch, f"epoch-{key}")
            if self.windowed:
                group = s.window_shards if s.shard_shuffle else 0
                self._parts[key] = rank_windows(self.shards, s.shard_id, s.num_shards, out, self.window,
                                                pad=self.drop_last, group=group, **interleave)
            else:
                self._parts[key] = [rank_view(self.shards, s.shard_id, s.num_shards, out, pad=self.drop_last,
                                              **interleave)]
            for old in [k for k in self._parts if k < key - 1]:  # its pipelines read their indexes at build
                del self._parts[old]
                shutil.rmtree(os.path.join(self._scratch, f"epoch-{old}"), ignore_errors=True)
        return self._parts[key]

    def batches(self, view: ShardSet) -> int:
        """Batches a reader gives for `view`: whole batches (training), or every sample."""
        n, b = view.total, self.spec.batch_size
        return n // b if self.drop_last else -(-n // b)

    def epoch_batches(self, epoch: int) -> int:
        return sum(self.batches(v) for v in self.parts(epoch))

    # ---------------------------------------------------------------- where the bytes are
    def objects(self, view: ShardSet) -> list:
        return list(dict.fromkeys(self.shards.objects[p] for p in view.paths)) if self.shards.is_remote else []

    def local(self, view: ShardSet, beat=None) -> ShardSet:
        """`view` over local files: bucket data read through the cache is fetched (and
        pinned until `release`); local data and direct reading are returned as they are."""
        if self.cache is None:
            return view
        objs = self.objects(view)
        paths = dict(zip((o.url for o in objs), self.cache.fetch(self.channel, objs, beat)))
        self._names.update({p: u for u, p in paths.items()})
        return dataclasses.replace(view, paths=[paths[p] for p in view.paths])

    def release(self, local: ShardSet | None) -> None:
        if self.cache is not None and local is not None:
            self.cache.release(self.channel, [self.shards.objects[self._names[p]] for p in dict.fromkeys(local.paths)])

    def announce(self, epoch: int, w: int) -> None:
        """Tell the node's fetcher what this rank reads from part `w` of `epoch` on (the part
        about to be fetched included: until it is pinned nothing may evict it), the rest of
        the epoch, then the next one, soonest first."""
        if self.cache is None:
            return
        views = self.parts(epoch)[w:] + self.parts(epoch + 1)
        self.cache.want(self.channel, [o for v in views for o in self.objects(v)])

    def url_of(self, text: str) -> str:
        """A message with local copies' paths put back as the URLs they came from."""
        for p, u in self._names.items():
            if p in text:
                text = text.replace(p, u)
        return text

    def close(self) -> None:
        if self.cache is not None:
            self.cache.close_channel(self.channel)
        shutil.rmtree(self._scratch, ignore_errors=True)
