"""Triton kernels against their torch references, on fresh random inputs at several
shapes (odd sizes that do not divide the block included), with the output poisoned
first so an unwritten element fails. On a machine with no GPU the kernels run through
the Triton interpreter (TRITON_INTERPRET=1, set in tests/conftest.py)."""
import os

import pytest
import torch

from hvdtrain import kernels
from hvdtrain.kernels.mixup import (mix_ref, mix_triton, sample_params, soft_cross_entropy_ref,
                           soft_cross_entropy_triton)
from hvdtrain.kernels.normalize import normalize, normalize_ref, normalize_triton
from hvdtrain.pipeline import MEAN, STD

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# relative error ||out - ref|| / ||ref||, per output dtype
TOL = {torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def rel_err(out, ref):
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in the output: an element was not written"
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def seeded(seed):
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("shape", [(2, 8, 8), (3, 7, 5), (1, 33, 17), (4, 16, 31)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_normalize_matches_reference(shape, dtype, channels_last):
    b, h, w = shape
    g = seeded(hash((shape, str(dtype), channels_last)) % 2**31)
    x = torch.randint(0, 256, (b, h, w, 3), dtype=torch.uint8, generator=g).to(DEV)
    flip = (torch.rand(b, generator=g) < 0.5).to(DEV)
    mean, std = torch.tensor(MEAN, device=DEV), torch.tensor(STD, device=DEV)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    out = torch.full((b, 3, h, w), float("nan"), dtype=dtype, device=DEV).contiguous(memory_format=fmt)
    got = normalize_triton(x, mean, std, flip, dtype, channels_last, out=out, block=64)
    ref = normalize_ref(x, mean, std, flip, dtype, channels_last)
    assert got.is_contiguous(memory_format=fmt) and got.dtype == dtype
    assert rel_err(got, normalize_ref(x.cpu(), mean.cpu(), std.cpu(), flip.cpu()).to(DEV)) < TOL[dtype]
    assert rel_err(got, ref) < TOL[dtype]


def test_normalize_without_flip_and_flip_really_flips():
    g = seeded(5)
    x = torch.randint(0, 256, (2, 4, 6, 3), dtype=torch.uint8, generator=g).to(DEV)
    mean, std = torch.tensor(MEAN, device=DEV), torch.tensor(STD, device=DEV)
    plain = normalize_triton(x, mean, std, None, block=32)
    flipped = normalize_triton(x, mean, std, torch.tensor([True, False], device=DEV), block=32)
    assert torch.equal(flipped[0], plain[0].flip(2)) and torch.equal(flipped[1], plain[1])


@pytest.mark.parametrize("shape", [(4, 3, 8, 8), (5, 3, 7, 9), (2, 3, 17, 13)])
@pytest.mark.parametrize("which", ["mixup", "cutmix"])
@pytest.mark.parametrize("channels_last", [False, True])
def test_mix_matches_reference(shape, which, channels_last):
    g = seeded(hash((shape, which, channels_last)) % 2**31)
    b, _, h, w = shape
    x = torch.randn(shape, generator=g).to(DEV)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (b,), generator=g).to(DEV)
    p = sample_params(h, w, 0.8 if which == "mixup" else 0.0, 1.0 if which == "cutmix" else 0.0, 0.5, g)
    assert p.mode == which
    out = torch.full_like(x, float("nan"))
    t = torch.full((b, 10), float("nan"), device=DEV)
    got_x, got_t = mix_triton(x, y, 10, p, smoothing=0.1, out=out, targets=t, block=64)
    ref_x, ref_t = mix_ref(x, y, 10, p, smoothing=0.1)
    assert rel_err(got_x, ref_x) < 1e-6 and rel_err(got_t, ref_t) < 1e-6
    assert torch.allclose(got_t.sum(1), torch.ones(b, device=DEV))


def test_cutmix_box_area_sets_the_target_weight():
    p = sample_params(32, 32, 0.0, 1.0, 0.5, seeded(3))
    y0, y1, x0, x1 = p.box
    assert p.lam == 1.0 and p.lam_eff == pytest.approx(1 - (y1 - y0) * (x1 - x0) / 1024)
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out, _ = mix_ref(x, torch.tensor([0, 1]), 2, p)
    inside = torch.zeros(32, 32, dtype=torch.bool)
    inside[y0:y1, x0:x1] = True
    assert torch.equal(out[0][:, inside], x[1][:, inside]) and torch.equal(out[0][:, ~inside], x[0][:, ~inside])


@pytest.mark.parametrize("rows,classes", [(4, 10), (7, 200), (3, 1000), (5, 13)])
def test_soft_cross_entropy_forward_and_backward(rows, classes):
    g = seeded(rows * 1000 + classes)
    logits = (3 * torch.randn(rows, classes, generator=g)).to(DEV)
    t = torch.softmax(torch.randn(rows, classes, generator=g), 1).to(DEV)
    a = logits.clone().requires_grad_()
    b = logits.clone().requires_grad_()
    la, lb = soft_cross_entropy_triton(a, t), soft_cross_entropy_ref(b, t)
    la_v, lb_v = la.detach(), lb.detach()
    (2.5 * la).backward()
    (2.5 * lb).backward()
    assert abs(la_v.item() - lb_v.item()) / abs(lb_v.item()) < 1e-5
    assert rel_err(a.grad, b.grad) < 1e-5


def test_dispatcher(monkeypatch):
    monkeypatch.setenv("HVDTRAIN_KERNELS", "ref")
    assert not kernels.use_triton(torch.device("cuda"))
    monkeypatch.setenv("HVDTRAIN_KERNELS", "auto")
    assert kernels.use_triton(torch.device("cuda")) and not kernels.use_triton(torch.device("cpu"))
    monkeypatch.setenv("HVDTRAIN_KERNELS", "triton")
    if os.environ.get("TRITON_INTERPRET") == "1":
        assert kernels.use_triton(torch.device("cpu"))
        x = torch.randint(0, 256, (2, 3, 5, 3), dtype=torch.uint8)
        m, s = torch.tensor(MEAN), torch.tensor(STD)
        assert rel_err(normalize(x, m, s, None), normalize_ref(x, m, s, None)) < 1e-6
    monkeypatch.setenv("HVDTRAIN_KERNELS", "fast")
    with pytest.raises(ValueError, match="ref or triton"):
        kernels.use_triton(torch.device("cpu"))
