"""What one rank reads: the one home of a run's data, below the trainer.

    train, val, data = open_data(cfg, rank, size, allgather, log)     # once per run
    view = rank_view(train, rank, size, out_dir, epoch=e, seed=s)     # the reader's input

`open_data` opens the splits (`data.shards`: indexes found or built, per node one
builder), settles the classes (`_info.json`, `--data.num_classes`, or the labels read
when the indexes were built), refuses what the task cannot train on before any DALI
pipeline exists (unlabeled samples for classify, samples without an image, labels out of
range: each named by shard and key), and with `--data.on_error=skip` drops the bad
samples, reusing `data.verify`'s per-shard records (kept in the cache by content, so a
requeued job decodes nothing again).

`rank_view` gives a rank's DALI reader only the index entries of the samples it reads:
its contiguous slice of the tars in order, or (interleaved: `--data.shard_shuffle`) its
slice of an epoch's permuted chunks of every tar. Whole tars keep their own index;
partial ones get a small index of their lines, cut out with numpy (no per-sample Python
objects). DALI then reads the view as its only shard (shard 0 of 1), so its memory per
rank falls as ranks are added. Train views are padded to ceil(total / size) samples by
repeating the last (DALI's `pad_last_batch`: every rank takes the same number of steps);
val views are not (the val pass sums over ranks once).
"""
from __future__ import annotations

import dataclasses
import math
import os

import numpy as np

from hvdtrain.data import cache
from hvdtrain.data.files import write_atomic
from hvdtrain.data.nodecache import local_copy
from hvdtrain.data.shards import ShardSet, open_shards
from hvdtrain.data.tarindex import ShardError, index_text, walk

MAX_CHUNKS = 8192  # auto chunk size: about this many chunks per epoch (index files written per rank)


def rank_range(total: int, rank: int, size: int) -> tuple[int, int]:
    """The global sample indices [lo, hi) of one rank: contiguous, by global index over the
    tars in the order given (DALI's own sharding, and the torch loader's)."""
    return total * rank // size, total * (rank + 1) // size


def auto_chunk(total: int) -> int:
    """Samples per interleaved chunk: small for mixing, large enough to bound the index files."""
    return min(256, max(4, math.ceil(total / MAX_CHUNKS)))


# ---------------------------------------------------------------- a rank's view
def pieces_of(counts: list[int], epoch: int | None = None, seed: int = 0, chunk: int = 0,
              group: int = 0) -> np.ndarray:
    """[(tar, first, last)] in reading order: whole tars in order (epoch None), or every tar
    cut into chunks permuted by (seed, epoch), the same on every rank. `group` (windowed
    reading): the tars are permuted, then each run of `group` tars has its chunks permuted
    among themselves, so a window of reading touches about `group` tars, not all of them."""
    counts = np.asarray(counts, dtype=np.int64)
    if epoch is None:
        return np.stack([np.arange(len(counts)), np.zeros_like(counts), counts], axis=1)
    chunk = chunk or auto_chunk(int(counts.sum()))
    if group:
        rng = np.random.default_rng([seed, epoch, group])
        tars = rng.permutation(len(counts))
        parts = [_chunks(counts, tars[g:g + group], chunk) for g in range(0, len(tars), group)]
        return np.concatenate([p[rng.permutation(len(p))] for p in parts])
    pieces = _chunks(counts, np.arange(len(counts)), chunk)
    order = np.random.default_rng([seed, epoch]).permutation(len(pieces))
    return pieces[order]


def _chunks(counts: np.ndarray, tars: np.ndarray, chunk: int) -> np.ndarray:
    """[(tar, first, last)]: tars `tars` (in that order) cut into runs of `chunk` samples."""
    per = -(-counts[tars] // chunk)
    tar = np.repeat(tars, per)
    first = (np.arange(len(tar)) - np.repeat(np.cumsum(per) - per, per)) * chunk
    last = np.minimum(first + chunk, counts[tar])
    return np.stack([tar, first, last], axis=1)


def slice_pieces(pieces: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """The parts of `pieces` that hold global positions [lo, hi)."""
    n = pieces[:, 2] - pieces[:, 1]
    start = np.cumsum(n) - n
    x, y = np.maximum(lo, start), np.minimum(hi, start + n)
    keep = x < y
    out = pieces[keep].copy()
    out[:, 1] = pieces[keep, 1] + x[keep] - start[keep]
    out[:, 2] = pieces[keep, 1] + y[keep] - start[keep]
    return out


class IndexLines:
    """The sample lines of index files, as byte ranges (one numpy array of newline offsets
    per file, read once)."""

    def __init__(self, shards: ShardSet):
        self.shards, self._cache = shards, {}

    def get(self, t: int) -> tuple[bytes, np.ndarray]:
        if t not in self._cache:
            path = self.shards.index_paths[t]
            with open(path, "rb") as f:
                data = f.read()
            if not data.endswith(b"\n"):
                data += b"\n"
            ends = np.flatnonzero(np.frombuffer(data, dtype=np.uint8) == 10)
            if len(ends) - 1 != self.shards.counts[t]:
                raise ShardError(f"{path}: {len(ends) - 1} sample lines for {self.shards.counts[t]} samples of "
                                 f"{self.shards.paths[t]}: rebuild it with `python -m data.make_shards --index-only`")
            self._cache = {t: (data, ends)} if len(self._cache) > 64 else {**self._cache, t: (data, ends)}
        return self._cache[t]

    def rows(self, t: int, a: int, b: int) -> bytes:
        data, ends = self.get(t)
        return data[ends[a] + 1:ends[b] + 1]  # line i (after the header) ends at ends[i + 1]


def rank_view(shards: ShardSet, rank: int, size: int, out_dir: str, *, pad: bool = True,
              epoch: int | None = None, seed: int = 0, chunk: int = 0) -> ShardSet:
    """Rank `rank`'s samples (of epoch `epoch` when interleaved) as a ShardSet whose indexes
    list only them, for a DALI reader of one shard. Index files it writes go to `out_dir`."""
    mine, extra = _rank_pieces(shards, rank, size, pad, epoch, seed, chunk)
    return _view(shards, mine, extra, out_dir, IndexLines(shards), "")


def window_samples(shards: ShardSet, window_shards: int, batch_size: int) -> int:
    """Samples per reader window: `window_shards` shards' worth on average, rounded up to
    whole batches (so a window ends where a batch ends, and every rank has the same
    number of batches per epoch)."""
    per_shard = shards.total / max(1, len(shards.counts))
    return max(1, math.ceil(window_shards * per_shard / batch_size)) * batch_size


def rank_windows(shards: ShardSet, rank: int, size: int, out_dir: str, window: int, *, pad: bool = True,
                 epoch: int | None = None, seed: int = 0, chunk: int = 0, group: int = 0) -> list[ShardSet]:
    """Rank `rank`'s samples of an epoch cut into windows of `window` samples (the last one
    takes the rest and the padding): a DALI reader per window, over shards a node cache
    holds at that moment. `group`: the tars of an interleaved epoch are permuted in runs
    of that many (pieces_of), so a window touches about `group` tars."""
    mine, extra = _rank_pieces(shards, rank, size, pad, epoch, seed, chunk, group)
    lines, out = IndexLines(shards), []
    total = int((mine[:, 2] - mine[:, 1]).sum())
    bounds = list(range(window, total, window))
    for k, (lo, hi) in enumerate(zip([0] + bounds, bounds + [total])):
        out.append(_view(shards, slice_pieces(mine, lo, hi), extra if hi == total else 0, out_dir, lines,
                         f"w{k:05d}-"))
    return out


def _rank_pieces(shards: ShardSet, rank: int, size: int, pad: bool, epoch, seed: int, chunk: int,
                 group: int = 0) -> tuple[np.ndarray, int]:
    """(this rank's pieces in reading order, padding samples to add after the last one)."""
    lo, hi = rank_range(shards.total, rank, size)
    mine = slice_pieces(pieces_of(shards.counts, epoch, seed, chunk, group), lo, hi)
    if not len(mine):
        raise ShardError(f"{shards.spec}: {shards.total} sample(s) for {size} ranks: rank {rank} has none")
    extra = (-(-shards.total // size) - (hi - lo)) if pad else 0  # DALI's pad_last_batch: every rank as long
    return mine, extra


def _view(shards: ShardSet, mine: np.ndarray, extra: int, out_dir: str, lines: IndexLines, prefix: str) -> ShardSet:
    """A ShardSet of `mine` (+ `extra` repeats of the last sample): whole tars keep their
    own index, parts of tars get index files of their lines in `out_dir`."""
    paths, idx_paths, counts = [], [], []
    os.makedirs(out_dir, exist_ok=True)
    for i, (t, a, b) in enumerate(mine.tolist()):
        last = i == len(mine) - 1
        n = b - a + (extra if last else 0)
        if a == 0 and b == shards.counts[t] and not (last and extra):
            idx_paths.append(shards.index_paths[t])  # a whole tar: its own index
        else:
            body = lines.rows(t, a, b) + (lines.rows(t, b - 1, b) * extra if last else b"")
            p = os.path.join(out_dir, f"{prefix}{i:06d}.idx")
            write_atomic(p, f"v1.2 {n}\n".encode() + body)
            idx_paths.append(p)
        paths.append(shards.paths[t])
        counts.append(n)
    return dataclasses.replace(shards, paths=paths, index_paths=idx_paths, counts=counts)


# ---------------------------------------------------------------- opening a run's data
def _first(metas: list[dict], paths: list[str], field: str):
    for p, m in zip(paths, metas):
        if m.get(field):
            return p, m
    return None, None


def settle_classes(shards: ShardSet, wanted: int, needs: bool, on_error: str, train: ShardSet | None = None) -> None:
    """Set `shards.num_classes` (classify) from _info.json, `--data.num_classes` or the labels,
    and refuse what the task cannot train on, naming a shard and a sample. `train`: the
    train split whose classes a val split must use."""
    metas, paths = shards.meta, shards.paths
    if metas is not None and on_error == "stop":
        p, m = _first(metas, paths, "noimage")
        if p:
            key, exts = m["noimage_first"]
            raise ShardError(f"{p}: sample {key} has no image member (it has {exts}; {sum(x['noimage'] for x in metas)} "
                             f"such sample(s) in {shards.spec}); the reader takes the image extensions of "
                             f"data.wds.IMAGE_EXTS. `python -m data.verify {shards.spec}` lists them; "
                             f"--data.on_error=skip trains without them")
    if not needs:
        return
    if shards.info_path is not None:
        if wanted and shards.num_classes and wanted != shards.num_classes:
            raise ShardError(f"--data.num_classes={wanted} but {shards.info_path} says {shards.num_classes} classes")
        if train is not None and not shards.num_classes:
            shards.num_classes = train.num_classes
        return
    if shards.unlabeled:
        p, m = _first(metas, paths, "unlabeled")
        key, exts = m["unlabeled_first"]
        raise ShardError(f"{p}: sample {key} has no .cls label (its members: {exts}; {shards.unlabeled} of "
                         f"{shards.total} samples in {shards.spec} are unlabeled): --train.task=classify needs a "
                         f"class index per sample; --train.task=contrastive trains on unlabeled images")
    p, m = _first(metas, paths, "bad_label")
    if p and on_error == "stop":
        key, raw = m["bad_label"]
        raise ShardError(f"{p}: sample {key}: label {raw!r} is not a decimal class index")
    labelled = [(m["max"], m["max_key"], pth) for pth, m in zip(paths, metas) if m["max"] is not None]
    top = max(x[0] for x in labelled) if labelled else None
    _, top_key, top_path = next((x for x in labelled if x[0] == top), (None, None, None))  # its first shard
    if train is not None:
        wanted = wanted or train.num_classes
    if wanted:
        if top is not None and top >= wanted:
            raise ShardError(f"{top_path}: sample {top_key} has label {top} out of range [0, {wanted}) "
                             f"(--data.num_classes={wanted})")
        shards.num_classes = wanted
    elif top is None:
        raise ShardError(f"{shards.spec}: no sample has a label: --train.task=classify needs them")
    else:
        shards.num_classes = top + 1


def remote_options(d):
    """How this node caches bucket data, from a run's DataConfig."""
    from hvdtrain.data.nodecache import Options

    return Options(mode=d.remote, cache_dir=d.cache_dir, cache_gb=d.cache_gb, workers=d.fetch_workers,
                   retry_s=d.remote_retry_s)


def open_data(cfg, rank: int = 0, size: int = 1, allgather=None, log=None, needs_classes: bool = True):
    """(train, val or None, data description) for a run's config on rank `rank` of `size`.
    `allgather(obj, name)`: the ranks' objects (on_error=skip shares its findings with it)."""
    d = cfg.data
    if not d.train:
        raise ShardError("no training data: pass --data.train=DIR (or a .tar, or a brace pattern)")
    skip = d.on_error == "skip"
    opts = remote_options(d)
    train = open_shards(d.train, check_fit=not skip, index_dir=d.index_dir, log=log, remote=opts)
    val = open_shards(d.val, check_fit=not skip, index_dir=d.index_dir, log=log, remote=opts) if d.val else None
    settle_classes(train, d.num_classes, needs_classes, d.on_error)
    if val is not None:
        settle_classes(val, d.num_classes, needs_classes, d.on_error, train)
    for split, shards in (("train", train), ("val", val)):
        if shards is not None and shards.total < size:
            raise ShardError(f"{split} data {shards.spec} has {shards.total} sample(s) for {size} ranks: every "
                             f"rank needs at least one")
    data = {"train": train.describe()}
    if val is not None:
        data["val"] = val.describe()
    if skip:
        nc = train.num_classes if needs_classes else None
        train, data["train"]["skipped"] = skip_bad(train, nc, rank, size, allgather, log)
        if val is not None:
            val, data["val"]["skipped"] = skip_bad(val, nc, rank, size, allgather, log)
    return train, val, data


# ---------------------------------------------------------------- on_error=skip
def skip_bad(shards: ShardSet, num_classes: int | None, rank: int = 0, size: int = 1, allgather=None,
             log=None) -> tuple[ShardSet, list[str]]:
    """--data.on_error=skip: the shards `data.verify` has no record of are checked by the
    ranks between them (shard i on rank i % size: each image decoded once, the record kept
    in the cache by the shard's content); the ranks share only the bad rows (one allgather).
    Each rank then lists the good samples of a damaged shard in an index in the cache."""
    from hvdtrain.data import verify

    mine, optional = {}, num_classes is None
    for i, tar in enumerate(shards.paths):
        rec = verify.cached_record(tar, num_classes, True, optional)
        if rec is None and i % size == rank:
            rec = verify.shard_record(tar, num_classes, True, optional)
        if rec is not None:
            mine[i] = (rec["bad"], [f"{tar}: {key}: {what}" for key, what in rec["skipped"]], rec["samples"],
                       rec["complete"])
    merged = dict(mine)
    if size > 1:
        for part in allgather(mine, name="skip_index"):
            merged.update(part)
    paths, idx, counts, skipped = [], [], [], []
    for i, tar in enumerate(shards.paths):
        bad, why, n, complete = merged[i]
        skipped += why
        if n < shards.counts[i]:  # listed by its index, gone from the (truncated) tar
            skipped += [f"{tar}: {shards.counts[i] - n} sample(s) its index lists: cut off by the end of a "
                        f"truncated tar"]
        if not bad and complete:
            paths.append(tar)
            idx.append(shards.index_paths[i])
            counts.append(shards.counts[i])
            continue
        out = cache.path("skip", f"{cache.signature(tar)}-{num_classes or 0}{'-u' if optional else ''}.idx")
        if os.path.exists(out):
            cache.used(out)
        else:
            with local_copy(tar, shards.remote) as path:
                w = walk(path, read_exts=(), tolerant=True)
            drop = set(bad)
            rows = [r for j, r in enumerate(w.samples) if j not in drop]
            if rows:
                cache.write_text(out, index_text(rows))
        kept = n - len(bad)
        if kept <= 0:
            continue  # nothing left in this shard
        paths.append(tar)
        idx.append(out)
        counts.append(kept)
    if not paths:
        raise ShardError(f"{shards.spec}: every sample is bad ({len(skipped)} skipped): {skipped[:3]}")
    if log and skipped:
        log(f"data: on_error=skip: {len(skipped)} bad sample(s) of {shards.spec} left out")
    return dataclasses.replace(shards, paths=paths, index_paths=idx, counts=counts), skipped
