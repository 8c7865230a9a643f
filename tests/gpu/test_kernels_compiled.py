"""The Triton kernels compiled for the GPU (not the interpreter the CPU suite uses) match
their torch references at training sizes: a batch of 64 at 224 px, 1000 classes. The same
tolerances as tests/unit/test_kernels.py (relative error per output dtype)."""
import os

import pytest
import torch

from hvdtrain import kernels
from hvdtrain.kernels.mixup import mix_ref, mix_triton, sample_params, soft_cross_entropy_ref, soft_cross_entropy_triton
from hvdtrain.kernels.normalize import normalize_ref, normalize_triton
from hvdtrain.pipeline import MEAN, STD
from tests.gpu.common import GPU
from tests.unit.test_kernels import TOL, rel_err

pytestmark = GPU
DEV = torch.device("cuda")


def test_the_kernels_are_compiled_not_interpreted():
    assert os.environ.get("TRITON_INTERPRET") != "1"
    assert kernels.describe(DEV) == "triton"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_at_training_size(dtype, channels_last):
    g = torch.Generator().manual_seed(1)
    x = torch.randint(0, 256, (64, 224, 224, 3), dtype=torch.uint8, generator=g).to(DEV)
    flip = (torch.rand(64, generator=g) < 0.5).to(DEV)
    mean, std = torch.tensor(MEAN, device=DEV), torch.tensor(STD, device=DEV)
    got = normalize_triton(x, mean, std, flip, dtype, channels_last)
    ref = normalize_ref(x, mean, std, flip, dtype, channels_last)
    assert got.is_cuda and got.is_contiguous(memory_format=torch.channels_last if channels_last else
                                             torch.contiguous_format)
    assert rel_err(got, ref) < TOL[dtype]


@pytest.mark.parametrize("which", ["mixup", "cutmix"])
def test_mix_at_training_size(which):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(64, 3, 224, 224, generator=g).to(DEV).contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 1000, (64,), generator=g).to(DEV)
    p = sample_params(224, 224, 0.8 if which == "mixup" else 0.0, 1.0 if which == "cutmix" else 0.0, 0.5, g)
    got_x, got_t = mix_triton(x, y, 1000, p, smoothing=0.1)
    ref_x, ref_t = mix_ref(x, y, 1000, p, smoothing=0.1)
    assert rel_err(got_x, ref_x) < 1e-6 and rel_err(got_t, ref_t) < 1e-6


def test_soft_cross_entropy_at_training_size():
    g = torch.Generator().manual_seed(3)
    logits = (3 * torch.randn(256, 1000, generator=g)).to(DEV)
    t = torch.softmax(torch.randn(256, 1000, generator=g), 1).to(DEV)
    a, b = logits.clone().requires_grad_(), logits.clone().requires_grad_()
    la, lb = soft_cross_entropy_triton(a, t), soft_cross_entropy_ref(b, t)
    la.backward()
    lb.backward()
    assert abs(la.item() - lb.item()) / abs(lb.item()) < 1e-5 and rel_err(a.grad, b.grad) < 1e-5
