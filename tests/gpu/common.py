"""What the GPU tests share: their marks (skipped with the reason on a machine with no
GPU; HVDTRAIN_REQUIRE_GPU=1 makes such a machine fail at start instead, tests/conftest.py),
small configs, and batches as the DALI loader hands them over on a GPU: views already on
the device, labels on the host (parsed from `.cls` bytes there)."""
from __future__ import annotations

import pytest
import torch

from gpucheck.runner import EXPECTED_SKIP
from hvdtrain import config as C
from hvdtrain import task as TK
from hvdtrain.batch import Batch

REASON = ("needs a CUDA GPU and torch sees none; on a GPU node run "
          "`HVDTRAIN_REQUIRE_GPU=1 python -m pytest -m gpu tests/gpu` (or `make gpu-check`)")
GPU = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason=REASON)]
CLASSES = 10


def skip_expected(why: str):
    """Skip for a reason that depends on the machine, not on the code (one GPU: no other
    device order to test). gpucheck counts such skips apart: they do not fail its
    gpu-tests stage under HVDTRAIN_REQUIRE_GPU=1; any other skip does."""
    pytest.skip(f"{EXPECTED_SKIP} {why}")


def small_cfg(task: str = "classify", amp: str = "off", accum: int = 2, clip: float = 0.0, model: str = "convnet",
              channels_last: bool = False, mixup: float = 0.0, cutmix: float = 0.0, optim: str = "adamw",
              lr: float = 0.002) -> C.Config:
    """The ci preset (32 px, batch 8, width 8) with the knobs a GPU test turns."""
    cfg = C.preset("ci")
    cfg.train.task, cfg.train.amp, cfg.train.grad_accum_steps = task, amp, accum
    cfg.train.clip_grad_norm, cfg.data.channels_last = clip, channels_last
    cfg.model.name, cfg.model.small_stem = model, model.startswith("resnet")
    cfg.aug.mixup, cfg.aug.cutmix = mixup, cutmix
    cfg.optim.name, cfg.optim.lr = optim, lr
    C.validate(cfg)
    return cfg


def device_batches(cfg: C.Config, n: int, seed: int = 0) -> list[Batch]:
    """n micro-batches shaped as the config asks: views on the GPU, int64 labels on the host."""
    g = torch.Generator().manual_seed(seed)
    b, s, views = cfg.train.batch_size, cfg.data.size, TK.get(cfg.train.task).views
    out = []
    for _ in range(n):
        vs = [torch.randn(b, 3, s, s, generator=g).cuda() for _ in range(views)]
        labels = torch.randint(0, CLASSES, (b,), generator=g)
        out.append(Batch(vs, labels, torch.zeros(b, 8, dtype=torch.uint8)))
    torch.cuda.synchronize()
    return out


def params(model: torch.nn.Module) -> torch.Tensor:
    """Every parameter, flattened into one float64 vector (a copy)."""
    return torch.cat([p.detach().double().flatten() for p in model.parameters()])
