"""The training tool's distributed parts as Horovod ranks see them: a val pass counts
every sample exactly once, clipping works with backward_passes_per_step, negatives
gathered from every rank carry gradients back, and resumed state reaches every rank."""
import math

import pytest
import torch

from hvdtrain import config as C
from hvdtrain import dist
from hvdtrain import valpass as E
from hvdtrain import loader as L
from hvdtrain import step as T
from hvdtrain import task as TK
from hvdtrain.loader import Batch
from tests.parallel.harness import make_data, param_vector


@pytest.mark.parametrize("n", [205, 64])
def test_val_pass_counts_every_sample_exactly_once(shared_dir, n):
    """205 = not divisible by ranks x batch (2 x 8); one allreduce reduces the sums."""
    shards = make_data(shared_dir, f"val{n}", n, shard_size=70)
    cfg = C.preset("ci")
    cfg.train.task = "classify"
    state = T.make_state(cfg, shards.num_classes)
    loader = L.from_config(cfg, shards, "val", threads=1)
    keys = [k for b in loader.epoch_batches() for k in b.keys()]
    every = dist.allgather_object(keys, name=f"valkeys{n}")
    flat = [k for ks in every for k in ks]
    assert len(flat) == n and len(set(flat)) == n, "a val sample was skipped or counted twice"
    r = E.evaluate(state, loader)
    assert r["val_samples"] == n
    assert 0 <= r["val_top1"] <= r["val_top5"] <= 1 and math.isfinite(r["val_loss"])
    again = E.evaluate(state, loader)  # the next pass reads the same set again
    assert again["val_samples"] == n and again["val_loss"] == pytest.approx(r["val_loss"], rel=1e-6)


def test_clipping_bounds_the_update_and_keeps_ranks_identical():
    """SGD without momentum: |update| = lr x |clipped global gradient| <= lr x clip, with
    4 backward passes per step (clip after synchronize(), step under skip_synchronize())."""
    cfg = C.preset("ci")
    cfg.train.task, cfg.train.grad_accum_steps, cfg.train.clip_grad_norm = "classify", 4, 1e-3
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum = "sgd", 0.5, 0.0
    state = T.make_state(cfg, num_classes=5)
    g = torch.Generator().manual_seed(7 + dist.rank())
    batches = [Batch([torch.randn(4, 3, 16, 16, generator=g)], torch.randint(0, 5, (4,), generator=g),
                     torch.zeros(4, 1, dtype=torch.uint8)) for _ in range(4)]
    before = param_vector(state.model).clone()
    out = T.train_step(state, batches)
    after = param_vector(state.model)
    assert float(out["grad_norm"]) > 1e-3  # the clip was active
    assert (after - before).norm() <= 0.5 * 1e-3 * 1.0001
    every = dist.allgather(after.unsqueeze(0), name="clip_params")
    assert all(torch.equal(every[0], every[r]) for r in range(dist.size()))


def test_gathered_negatives_use_every_ranks_batch_and_carry_gradients():
    """With uninformative embeddings the loss is ln(candidates): ln(B x ranks) gathered,
    ln(B) local; the gather's backward returns each rank its own rows' gradient."""
    torch.manual_seed(100 + dist.rank())
    b = 16
    z1 = torch.randn(b, 4096, requires_grad=True)
    z2 = torch.randn(b, 4096)
    gathered = TK.info_nce(z1, z2, 1.0, gather=dist.allgather_grad, rank=dist.rank())
    local = TK.info_nce(z1, z2, 1.0)
    assert gathered.item() == pytest.approx(math.log(b * dist.size()), abs=0.05)
    assert local.item() == pytest.approx(math.log(b), abs=0.05)
    gathered.backward()
    assert z1.grad is not None and z1.grad.shape == (b, 4096) and z1.grad.abs().sum() > 0


def test_resume_state_loaded_on_rank0_reaches_every_rank():
    """make_state(ckpt) on rank 0 only: parameters, optimizer state and step arrive everywhere."""
    cfg = C.preset("ci")
    cfg.train.task, cfg.optim.name = "classify", "adamw"
    cfg.optim.weight_decay = 0.1  # Horovod's zero-gradient state init would move non-root params
    src = T.make_state(cfg, num_classes=5)
    g = torch.Generator().manual_seed(3)
    x, y = torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 5, (8,), generator=g)
    T.train_step(src, [Batch([x[:4]], y[:4], torch.zeros(4, 1, dtype=torch.uint8)),
                       Batch([x[4:]], y[4:], torch.zeros(4, 1, dtype=torch.uint8))])  # a real optimizer state
    saved = {"model": src.model.state_dict(), "optimizer": src.opt.state_dict(), "step": 7}
    state = T.make_state(cfg, num_classes=5, ckpt=saved if dist.is_primary() else None)
    assert state.step == 7
    every = dist.allgather(param_vector(state.model).unsqueeze(0), name="resumed_params")
    # src trained on the same batch on every rank (a seed shared by all ranks), so each rank's
    # src equals rank 0's: every rank checks that rank 0's resumed parameters are that state
    assert torch.equal(every[0], param_vector(src.model))
    assert all(torch.equal(every[0], every[r]) for r in range(dist.size()))
    sq = torch.cat([s["exp_avg_sq"].reshape(-1) for s in state.opt.state_dict()["state"].values()])
    assert sq.numel() == param_vector(state.model).numel()
    every = dist.allgather(sq.unsqueeze(0), name="resumed_opt")
    assert all(torch.equal(every[0], every[r]) for r in range(dist.size()))


def test_channels_last_inputs_train_under_horovod():
    """`data.channels_last`: the inputs are NHWC, the weights and so the gradients stay
    contiguous (Horovod 0.28 refuses non-contiguous tensors: 'Tensor is required to be
    contiguous'), and ranks stay identical."""
    cfg = C.preset("ci")
    cfg.train.task, cfg.data.channels_last, cfg.model.name, cfg.model.small_stem = "classify", True, "resnet18", True
    state = T.make_state(cfg, num_classes=5)
    g = torch.Generator().manual_seed(11 + dist.rank())
    x = torch.randn(4, 3, 16, 16, generator=g)
    batches = [Batch([x], torch.randint(0, 5, (4,), generator=g), torch.zeros(4, 1, dtype=torch.uint8))] * 2
    T.train_step(state, batches)
    assert all(p.is_contiguous() for p in state.model.parameters())
    every = dist.allgather(param_vector(state.model).unsqueeze(0), name="cl_params")
    assert all(torch.equal(every[0], every[r]) for r in range(dist.size()))


def test_the_amp_order_with_a_grad_scaler_and_fp16_wire_compression():
    """The GPU step's order, run on the CPU: bf16 autocast, GradScaler, clipping and
    Horovod's fp16 compression: synchronize() -> unscale_ -> clip -> step() under
    skip_synchronize() -> update(). Ranks stay identical and the update is bounded."""
    cfg = C.preset("ci")
    cfg.train.task, cfg.train.clip_grad_norm, cfg.train.fp16_allreduce = "classify", 1e-3, True
    cfg.optim.name, cfg.optim.lr, cfg.optim.momentum = "sgd", 0.5, 0.0
    state = T.make_state(cfg, num_classes=5)
    state.amp, state.scaler = torch.bfloat16, torch.amp.GradScaler("cpu", init_scale=1024.0)
    g = torch.Generator().manual_seed(5 + dist.rank())
    batches = [Batch([torch.randn(4, 3, 16, 16, generator=g)], torch.randint(0, 5, (4,), generator=g),
                     torch.zeros(4, 1, dtype=torch.uint8)) for _ in range(cfg.train.grad_accum_steps)]
    before = param_vector(state.model).clone()
    out = T.train_step(state, batches)
    after = param_vector(state.model)
    assert math.isfinite(float(out["loss"])) and float(out["grad_norm"]) > 1e-3  # unscaled before the clip
    assert 0 < (after - before).norm() <= 0.5 * 1e-3 * 1.01
    assert state.scaler.get_scale() == 1024.0  # finite gradients: no back-off
    every = dist.allgather(after.unsqueeze(0), name="amp_params")
    assert all(torch.equal(every[0], every[r]) for r in range(dist.size()))
