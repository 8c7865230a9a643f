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

from data.wds import ShardSet, rank_range, read_index, write_index_rows

MAX_CHUNKS = 8192  # auto chunk size: about this many chunks per epoch (index files written per rank)


def auto_chunk(total: int) -> int:
    """Samples per chunk: small for mixing, large enough to bound the index files."""
    return min(256, max(4, math.ceil(total / MAX_CHUNKS)))


def epoch_slice(shards: ShardSet, seed: int, epoch: int, rank: int, size: int, chunk: int, out_dir: str) -> ShardSet:
    """Rank `rank`'s samples of epoch `epoch`, as a ShardSet of chunk indexes in `out_dir`."""
    chunk = chunk or auto_chunk(shards.total)
    pieces = []
    for tar, idx in zip(shards.paths, shards.index_paths):
        rows = read_index(idx)
        pieces += [(tar, rows[i:i + chunk]) for i in range(0, len(rows), chunk)]
    random.Random(seed * 1_000_003 + epoch).shuffle(pieces)
    lo, hi = rank_range(shards.total, rank, size)
    per_rank = -(-shards.total // size)
    mine, pos = [], 0
    for tar, rows in pieces:
        a, b = max(lo, pos), min(hi, pos + len(rows))
        if a < b:
            mine.append((tar, rows[a - pos:b - pos]))
        pos += len(rows)
    if hi - lo < per_rank and mine:  # pad like DALI's pad_last_batch: every rank as long
        tar, rows = mine[-1]
        mine[-1] = (tar, rows + [rows[-1]] * (per_rank - (hi - lo)))
    os.makedirs(out_dir, exist_ok=True)
    paths, idx_paths, counts = [], [], []
    for i, (tar, rows) in enumerate(mine):
        p = os.path.join(out_dir, f"{i:06d}.idx")
        counts.append(write_index_rows(p, rows))
        paths.append(tar)
        idx_paths.append(p)
    return dataclasses.replace(shards, paths=paths, index_paths=idx_paths, counts=counts)
