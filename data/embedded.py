"""The embedded data set: the synthetic shards the sanity (and bench.throughput) train on
when no `--data.train` is given, built once under runs/data/ by whichever process gets
there first (a lock in the cache: the ranks on a node wait for it, no collective needed).

    train_dir = embedded.ensure(seed=1337)    # runs/data/synth-c10-s64-seed1337/train
"""
from __future__ import annotations

import os

from hvdtrain.data import cache, synth
from hvdtrain.data.wds import INFO_NAME

CLASSES, TRAIN, VAL, SIZE = 10, 4096, 1024, 64  # 10 classes of 64 px shapes: 4096 train, 1024 val


def root(seed: int, base: str = "runs") -> str:
    return os.path.join(base, "data", f"synth-c{CLASSES}-s{SIZE}-seed{seed}")


def ensure(seed: int, base: str = "runs", log=print) -> str:
    """The embedded set's train folder, built now if it is not there."""
    out = root(seed, base)
    done = os.path.join(out, "train", INFO_NAME)
    if not os.path.exists(done):
        with cache.lock(f"embedded-{os.path.abspath(out).replace(os.sep, '_')}", log, f"building {out}"):
            if not os.path.exists(done):
                log(f"building the embedded synthetic data set under {out} ...")
                synth.make(out, classes=CLASSES, train=TRAIN, val=VAL, size=SIZE, seed=seed)
    return os.path.join(out, "train")
