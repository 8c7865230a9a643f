"""Helpers the parallel tests share (run under horovodrun -np 2): shard sets made by
rank 0 in a folder every rank sees, and a model's parameters as one vector."""
import os

import torch

from hvdtrain.data.shards import open_shards
from hvdtrain import dist
from tests.conftest import unique_shards


def make_data(shared_dir, name, n, shard_size):
    out = os.path.join(shared_dir, name)
    if dist.is_primary():
        unique_shards(out, n=n, shard_size=shard_size)
    dist.barrier()
    return open_shards(out)


def param_vector(model):
    return torch.cat([p.detach().reshape(-1) for p in model.parameters()])
