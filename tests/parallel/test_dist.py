"""Data parallelism as Horovod ranks see it: sharding, equal steps, identical
parameters, and gradient accumulation equal to one large batch."""
import pytest
import torch

from hvdtrain import config as C
from hvdtrain import dist
from hvdtrain import loader as L
from hvdtrain import step as T
from hvdtrain.loader import Batch, DaliLoader
from hvdtrain.pipeline import PipeSpec
from tests.parallel.harness import make_data, param_vector


def rank_spec(**kw):
    base = dict(batch_size=10, num_threads=1, shard_id=dist.rank(), num_shards=dist.size(), device_id=None,
                seed=11 + dist.rank(), size=32, shuffle_buffer=32)
    base.update(kw)
    return PipeSpec(**base)


def test_world_is_two_ranks():
    assert dist.size() == 2, "run tests/parallel under horovodrun -np 2"


@pytest.mark.parametrize("kind", ["dali", "torch"])
@pytest.mark.parametrize("n", [200, 205])
def test_ranks_read_disjoint_samples_and_take_equal_steps(shared_dir, n, kind):
    from hvdtrain.torch_loader import TorchLoader

    shards = make_data(shared_dir, f"uniq{n}", n, shard_size=60)
    loader = DaliLoader(shards, rank_spec()) if kind == "dali" else TorchLoader(shards, rank_spec(), workers=0)
    keys = [k for b in loader.epoch_batches() for k in b.keys()]
    all_keys = dist.allgather_object(keys, name=f"keys{n}{kind}")
    counts = [len(k) for k in all_keys]
    assert len(set(counts)) == 1, f"ranks took different numbers of batches: {counts}"
    assert counts[0] == (n // dist.size()) // 10 * 10
    assert all(len(set(k)) == len(k) for k in all_keys), "a rank saw a sample twice in one epoch"
    for i in range(dist.size()):
        for j in range(i + 1, dist.size()):
            assert not set(all_keys[i]) & set(all_keys[j]), f"ranks {i} and {j} share samples"
    if n % (10 * dist.size()) == 0:
        assert len(set().union(*all_keys)) == n  # even split: every sample read exactly once


def test_parameters_identical_on_all_ranks_after_training(shared_dir):
    shards = make_data(shared_dir, "train_small", 96, shard_size=50)
    cfg = C.preset("ci")
    cfg.train.steps = 3
    _, dali_threads = T.configure_threads(cfg)
    state = T.make_state(cfg, shards.num_classes)
    before = param_vector(state.model).clone()
    loader = L.from_config(cfg, shards, "train", dali_threads)
    res = T.run_loop(state, loader, cfg.train.steps)
    after = param_vector(state.model)
    assert not torch.equal(before, after), "training did not change the parameters"
    every = dist.allgather(after.unsqueeze(0), name="params_after")
    for r in range(1, dist.size()):
        assert torch.equal(every[0], every[r]), f"rank {r} parameters differ from rank 0"
    losses = dist.allgather_object(res.step_losses, name="losses_per_rank")
    assert losses[0] == losses[1], "logged losses are the mean over ranks: the same on every rank"
    last = dist.allgather_object(loader.last_source, name="last_source")
    assert len(set(last)) == dist.size(), f"ranks trained on the same data: {last}"


def test_accumulated_micro_batches_equal_one_large_batch():
    """8 micro-batches with backward_passes_per_step=8 must give the same update as one
    8x batch with backward_passes_per_step=1 (GroupNorm: no batch-dependent layers)."""
    accum, micro = 8, 4
    g = torch.Generator().manual_seed(100 + dist.rank())  # different data on each rank
    x = torch.randn(accum * micro, 3, 16, 16, generator=g)
    y = torch.randint(0, 5, (accum * micro,), generator=g)
    results = []
    for steps, batches in ((accum, [Batch([x[i * micro:(i + 1) * micro]], y[i * micro:(i + 1) * micro],
                                          torch.zeros(micro, 1, dtype=torch.uint8)) for i in range(accum)]),
                           (1, [Batch([x], y, torch.zeros(len(y), 1, dtype=torch.uint8))])):
        cfg = C.preset("ci")
        cfg.train.task, cfg.train.grad_accum_steps = "classify", steps
        cfg.optim.name, cfg.optim.lr, cfg.optim.momentum = "sgd", 0.5, 0.0
        state = T.make_state(cfg, num_classes=5)
        loss = T.train_step(state, batches)["loss"]
        results.append((loss, param_vector(state.model).clone()))
    (loss_a, pa), (loss_b, pb) = results
    assert torch.allclose(loss_a, loss_b, rtol=1e-5, atol=1e-6)
    assert torch.allclose(pa, pb, rtol=1e-4, atol=1e-6), f"max diff {(pa - pb).abs().max():.3g}"
