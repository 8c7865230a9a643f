"""One epoch of the training loader on every rank of a real launch, as training builds
it (`loader.from_config`: shard_id = global rank): rank 0 writes OUT (JSON) with each
rank's placement, DALI shard id and the sample keys it read.

    launch/slurm_run.sh tests.slurm.epoch_probe OUT --preset ci --data.train=DIR [...]
"""
from __future__ import annotations

import json
import sys

from hvdtrain import config as C
from hvdtrain import dist
from hvdtrain import loader as L
from hvdtrain.data.shards import open_shards


def main(argv: list[str]) -> int:
    out, cfg = argv[0], C.parse_args(argv[1:], default_preset="ci")[0]
    dist.init()
    loader = L.from_config(cfg, open_shards(cfg.data.train), "train", threads=1)
    keys = [k for b in loader.epoch_batches() for k in b.keys()]
    mine = {"keys": keys, "shard_id": loader.spec.shard_id, "num_shards": loader.spec.num_shards}
    every = dist.allgather_object(mine, name="probe")
    placement = dist.placement()
    if dist.is_primary():
        with open(out, "w") as f:
            json.dump({"ranks": [{**p, **e} for p, e in zip(placement, every)]}, f)
    dist.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
