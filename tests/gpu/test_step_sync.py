"""The step never waits on the host: `train_step` under torch.cuda.set_sync_debug_mode("error"),
which raises at any synchronizing CUDA call torch makes (`.item()`, `float(t)`, `bool(t)`,
a blocking copy either way, `nonzero`, a stream or event synchronize), for classify and
contrastive, with accumulation, AMP bf16, fp16 + GradScaler + clipping, mixup/cutmix's
kernels and channels_last. In the loop the log point is the only place allowed to sync:
the mode is switched off inside `_log_point` and nowhere else.

The first step of each model runs outside the check: one-time set-up (cuBLAS handles,
lazily loaded kernels, the fused optimizer's state) is not the step's cost. A sync that
happens every step shows in the steps after it. With one rank Horovod registers no
gradient hooks, so Horovod's own collectives are not covered here (they sync in C++, which
torch's check does not see anyway).
"""
import math

import pytest
import torch

from hvdtrain import pipeline
from hvdtrain import step as S
from hvdtrain.loader import DaliLoader
from hvdtrain.synthetic import InMemoryLoader
from tests.gpu.common import CLASSES, GPU, device_batches, params, small_cfg

pytestmark = GPU

CASES = {
    "classify-fp32-accum2": dict(task="classify", amp="off", accum=2),
    "classify-bf16-accum2": dict(task="classify", amp="bf16", accum=2),
    "classify-fp16-scaler-clip": dict(task="classify", amp="fp16", accum=2, clip=0.5),
    "classify-bf16-mixup-cutmix": dict(task="classify", amp="bf16", accum=2, mixup=0.2, cutmix=1.0),
    "classify-resnet18-channels-last-fp16-clip-sgd": dict(task="classify", amp="fp16", accum=2, clip=0.5,
                                                          model="resnet18", channels_last=True, optim="sgd"),
    "contrastive-bf16-accum3": dict(task="contrastive", amp="bf16", accum=3),
    "contrastive-fp16-scaler-clip": dict(task="contrastive", amp="fp16", accum=2, clip=0.5),
}


class SyncDebug:
    """torch.cuda.set_sync_debug_mode for a block, restored however the block ends."""

    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        self.old = torch.cuda.get_sync_debug_mode()
        torch.cuda.set_sync_debug_mode(self.mode)

    def __exit__(self, *exc):
        torch.cuda.set_sync_debug_mode(self.old)


@pytest.mark.parametrize("case", list(CASES))
def test_train_step_never_waits_on_the_host(hvd, case):
    cfg = small_cfg(**CASES[case])
    state = S.make_state(cfg, CLASSES)
    accum = cfg.train.grad_accum_steps
    batches = device_batches(cfg, 4 * accum)
    S.train_step(state, batches[:accum])  # one-time set-up, outside the check
    before = params(state.model)
    with SyncDebug("error"):
        for i in range(1, 4):
            out = S.train_step(state, batches[i * accum:(i + 1) * accum])
    assert all(t.is_cuda for t in out.values() if isinstance(t, torch.Tensor))
    assert math.isfinite(out["loss"].item()) and state.step == 4
    assert not torch.equal(params(state.model), before), "the checked steps did not update the weights"


def test_the_log_point_is_the_loops_only_sync(hvd, monkeypatch):
    cfg = small_cfg(amp="bf16", accum=2)
    cfg.train.log_every = 3
    state = S.make_state(cfg, CLASSES)
    loader = InMemoryLoader(device_batches(cfg, 4))
    S.run_loop(state, loader, 1)  # one-time set-up, outside the check
    real_log_point, calls = S._log_point, []

    def log_point(*a, **k):
        calls.append(1)
        with SyncDebug(0):  # the one place the loop may wait for the device
            return real_log_point(*a, **k)

    monkeypatch.setattr(S, "_log_point", log_point)
    with SyncDebug("error"):
        res = S.run_loop(state, loader, 6)
    assert len(calls) == 2 and len(res.step_losses) == 6 and all(map(math.isfinite, res.step_losses))
    assert sum(res.phase_s.values()) > 0  # the CUDA-event breakdown was read at the log points


@pytest.mark.parametrize("normalize", ["dali", "kernel"])
def test_the_loop_on_dalis_mixed_loader_syncs_only_at_the_log_point(hvd, photo_shards, monkeypatch, normalize):
    """The same with real batches: DALI's mixed decode feeding the loop (normalize=kernel:
    uint8 crops normalized on the GPU by the Triton kernel). Handing over a batch must not
    wait for the device either: the loop would stall every step."""
    cfg = small_cfg(amp="bf16", accum=2, channels_last=True)
    cfg.data.decode, cfg.data.normalize, cfg.train.log_every = "mixed", normalize, 2
    spec = pipeline.spec_from_config(cfg, "train", device_id=0, threads=2, written_shuffled=photo_shards.shuffled)
    loader = DaliLoader(photo_shards, spec, num_classes=photo_shards.num_classes, device=torch.device("cuda", 0),
                        channels_last=True)
    state = S.make_state(cfg, photo_shards.num_classes)
    S.run_loop(state, loader, 1)
    real_log_point = S._log_point

    def log_point(*a, **k):
        with SyncDebug(0):
            return real_log_point(*a, **k)

    monkeypatch.setattr(S, "_log_point", log_point)
    with SyncDebug("error"):
        res = S.run_loop(state, loader, 4)
    assert len(res.step_losses) == 4 and all(map(math.isfinite, res.step_losses))
