"""True shuffling across shards for DALI's webdataset reader: one rank's slice of an
epoch, as a list of small chunks drawn from every tar.

DALI's reader reads its tars in order and shuffles only inside its `initial_fill` buffer,
and gives each rank a contiguous run of samples; shards written class by class (as other
tools often write them) then show a rank a few classes at a time. Here each epoch:

1. every tar's index is cut into chunks of `chunk` consecutive samples;
2. the chunks are permuted with a seed of (order seed, epoch): the same on every rank,
   another order every epoch;
3. rank r takes the r-th contiguous slice of that order (`data.wds.rank_range`), padded
   to ceil(total / size) samples by repeating its last sample (DALI's `pad_last_batch`), so
   every rank takes the same number of steps;
4. each piece of the slice becomes a small `.idx` listing those samples of their tar, and
   DALI reads the slice as its only shard (shard_id 0 of 1).

Every sample is read once per epoch across ranks (the padding repeats at most one per
rank, as DALI's own sharding does). The buffer then holds initial_fill / chunk chunks from
as many tars. The pipeline is rebuilt for each epoch; its DALI checkpoint restores a
position within the same epoch's slice, which is rebuilt from (seed, epoch, rank, size),
so resume stays exact. DALI maps a tar once however many pieces name it.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random

from data.wds import ShardError, ShardSet, rank_range

MAX_CHUNKS = 8192  # auto chunk size: about this many chunks per epoch (index files written per rank)


def auto_chunk(total: int) -> int:
    """Samples per chunk: small for mixing, large enough to bound the index files."""
    return min(256, max(4, math.ceil(total / MAX_CHUNKS)))


def epoch_slice(shards: ShardSet, seed: int, epoch: int, rank: int, size: int, chunk: int, out_dir: str) -> ShardSet:
    """Rank `rank`'s samples of epoch `epoch`, as a ShardSet of chunk indexes in `out_dir`.

    The chunk order comes from the shards' sample counts alone; only the index lines of
    this rank's chunks are kept (as text), so an ImageNet-sized epoch costs one read of the
    index files and about 1/size of their lines in memory."""
    chunk = chunk or auto_chunk(shards.total)
    pieces = [(t, i, min(i + chunk, n)) for t, n in enumerate(shards.counts) for i in range(0, n, chunk)]
    random.Random(seed * 1_000_003 + epoch).shuffle(pieces)
    lo, hi = rank_range(shards.total, rank, size)
    mine, pos = [], 0  # (tar number, first, last) sample ranges of this rank, in reading order
    for t, a, b in pieces:
        x, y = max(lo, pos), min(hi, pos + b - a)
        if x < y:
            mine.append((t, a + x - pos, a + y - pos))
        pos += b - a
    if not mine:
        raise ShardError(f"{shards.spec}: {shards.total} sample(s) for {size} ranks: rank {rank} has none")
    lines = _index_lines(shards, {t for t, _, _ in mine})
    pad = -(-shards.total // size) - (hi - lo)  # DALI's pad_last_batch: every rank as long
    os.makedirs(out_dir, exist_ok=True)
    paths, idx_paths, counts = [], [], []
    for i, (t, a, b) in enumerate(mine):
        rows = lines[t][a:b] + (lines[t][b - 1:b] * pad if i == len(mine) - 1 else [])
        p = os.path.join(out_dir, f"{i:06d}.idx")
        tmp = p + ".tmp"
        with open(tmp, "w") as f:
            f.write(f"v1.2 {len(rows)}\n" + "".join(rows))
        os.replace(tmp, p)
        paths.append(shards.paths[t])
        idx_paths.append(p)
        counts.append(len(rows))
    return dataclasses.replace(shards, paths=paths, index_paths=idx_paths, counts=counts)


def _index_lines(shards: ShardSet, wanted: set[int]) -> dict[int, list[str]]:
    """The sample lines (after the header) of the wanted tars' indexes, checked against the counts."""
    out = {}
    for t in sorted(wanted):
        with open(shards.index_paths[t]) as f:
            f.readline()
            out[t] = [x if x.endswith("\n") else x + "\n" for x in f if x.strip()]
        if len(out[t]) != shards.counts[t]:
            raise ShardError(f"{shards.index_paths[t]}: {len(out[t])} sample lines, its header says "
                             f"{shards.counts[t]}: rebuild it with `python -m data.make_shards --index-only`")
    return out
