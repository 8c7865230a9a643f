"""Batch mixup / cutmix with label-smoothed soft targets, and a soft-target cross-entropy.

Convention (timm's): each sample b is mixed with its partner B-1-b (the batch flipped).
One image kernel covers both: out = inside_box ? partner : lam * x + (1 - lam) * partner,
so mixup is "empty box" and cutmix is "lam = 1 plus a box". A second, tiny kernel
writes the soft targets lam_eff * smooth(y_b) + (1 - lam_eff) * smooth(y_partner), where
lam_eff is the share of the image still from x (cutmix: 1 - box area / image area).
Parameters (lam, box) are drawn per batch on the host by `sample_params`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from hvdtrain import kernels
from hvdtrain.kernels.normalize import triton_cdiv


@dataclass(frozen=True)
class MixParams:
    lam: float                       # image weight of x (mixup); 1.0 for cutmix
    box: tuple[int, int, int, int]   # y0, y1, x0, x1 (half-open); empty for mixup
    lam_eff: float                   # target weight of y (after the box is clipped)
    mode: str                        # "mixup" | "cutmix" | "none"


def sample_params(h: int, w: int, mixup_alpha: float, cutmix_alpha: float, switch_prob: float,
                  gen: torch.Generator) -> MixParams:
    """lam ~ Beta(alpha, alpha); with both enabled, cutmix with probability switch_prob."""
    use_cutmix = cutmix_alpha > 0 and (mixup_alpha <= 0 or float(torch.rand((), generator=gen)) < switch_prob)
    alpha = cutmix_alpha if use_cutmix else mixup_alpha
    if alpha <= 0:
        return MixParams(1.0, (0, 0, 0, 0), 1.0, "none")
    g1 = torch._standard_gamma(torch.tensor([alpha, alpha], dtype=torch.float64), generator=gen)
    lam = float(g1[0] / g1.sum())
    if not use_cutmix:
        return MixParams(lam, (0, 0, 0, 0), lam, "mixup")
    cut = math.sqrt(1.0 - lam)
    ch, cw = int(h * cut), int(w * cut)
    cy, cx = int(torch.randint(0, h, (), generator=gen)), int(torch.randint(0, w, (), generator=gen))
    y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
    x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
    return MixParams(1.0, (y0, y1, x0, x1), 1.0 - (y1 - y0) * (x1 - x0) / (h * w), "cutmix")


def smooth_one_hot(y: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((y.shape[0], num_classes), off, device=y.device).scatter_(
        1, y.view(-1, 1), 1.0 - smoothing + off)


def mix_ref(x: torch.Tensor, y: torch.Tensor, num_classes: int, p: MixParams,
            smoothing: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [B, C, H, W] float; y: int64 [B]. Returns (mixed images, soft targets fp32 [B, K])."""
    partner = x.flip(0)
    out = (p.lam * x.float() + (1 - p.lam) * partner.float()).to(x.dtype)
    y0, y1, x0, x1 = p.box
    out[:, :, y0:y1, x0:x1] = partner[:, :, y0:y1, x0:x1]
    t = smooth_one_hot(y, num_classes, smoothing)
    return out, p.lam_eff * t + (1 - p.lam_eff) * t.flip(0)


_k = {}


def _kernels():
    if not _k:
        import triton
        import triton.language as tl

        @triton.jit
        def mix_kernel(x_ptr, out_ptr, lam, y0, y1, x0, x1, B, C, H, W, sb, sc, sh, sw,
                       BLOCK: tl.constexpr):
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < B * C * H * W
            w = offs % W
            h = (offs // W) % H
            c = (offs // (W * H)) % C
            b = offs // (W * H * C)
            src = c * sc + h * sh + w * sw            # strides: NCHW or channels_last alike
            a = tl.load(x_ptr + b * sb + src, mask=mask, other=0.0).to(tl.float32)
            p = tl.load(x_ptr + (B - 1 - b) * sb + src, mask=mask, other=0.0).to(tl.float32)
            inside = (h >= y0) & (h < y1) & (w >= x0) & (w < x1)
            v = tl.where(inside, p, lam * a + (1.0 - lam) * p)
            tl.store(out_ptr + b * sb + src, v.to(out_ptr.dtype.element_ty), mask=mask)

        @triton.jit
        def targets_kernel(y_ptr, t_ptr, B, K, lam, on, off, BLOCK_K: tl.constexpr):
            b = tl.program_id(0)
            k = tl.arange(0, BLOCK_K)
            m = k < K
            ya = tl.load(y_ptr + b)
            yp = tl.load(y_ptr + (B - 1 - b))
            ta = tl.where(k == ya, on, off)
            tp = tl.where(k == yp, on, off)
            tl.store(t_ptr + b * K + k, lam * ta + (1.0 - lam) * tp, mask=m)

        @triton.jit
        def soft_ce_fwd(logits_ptr, t_ptr, loss_ptr, lse_ptr, K, BLOCK_K: tl.constexpr):
            r = tl.program_id(0).to(tl.int64)
            k = tl.arange(0, BLOCK_K)
            m = k < K
            z = tl.load(logits_ptr + r * K + k, mask=m, other=-float("inf")).to(tl.float32)
            t = tl.load(t_ptr + r * K + k, mask=m, other=0.0).to(tl.float32)
            zmax = tl.max(z, axis=0)
            lse = zmax + tl.log(tl.sum(tl.exp(z - zmax), axis=0))
            tz = tl.sum(t * tl.where(m, z, 0.0), axis=0)
            tl.store(loss_ptr + r, lse * tl.sum(t, axis=0) - tz)
            tl.store(lse_ptr + r, lse)

        @triton.jit
        def soft_ce_bwd(logits_ptr, t_ptr, lse_ptr, gout_ptr, grad_ptr, inv_rows, K, BLOCK_K: tl.constexpr):
            r = tl.program_id(0).to(tl.int64)
            k = tl.arange(0, BLOCK_K)
            m = k < K
            z = tl.load(logits_ptr + r * K + k, mask=m, other=0.0).to(tl.float32)
            t = tl.load(t_ptr + r * K + k, mask=m, other=0.0).to(tl.float32)
            lse = tl.load(lse_ptr + r)
            scale = tl.load(gout_ptr).to(tl.float32) * inv_rows  # read on the device: no host sync
            g = (tl.exp(z - lse) * tl.sum(t, axis=0) - t) * scale
            tl.store(grad_ptr + r * K + k, g.to(grad_ptr.dtype.element_ty), mask=m)

        _k.update(mix=mix_kernel, targets=targets_kernel, fwd=soft_ce_fwd, bwd=soft_ce_bwd,
                  next_pow2=triton.next_power_of_2)
    return _k


def mix_triton(x: torch.Tensor, y: torch.Tensor, num_classes: int, p: MixParams, smoothing: float = 0.0,
               out: torch.Tensor | None = None, targets: torch.Tensor | None = None,
               block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    k = _kernels()
    B, C, H, W = x.shape
    out = torch.empty_like(x) if out is None else out
    if out.stride() != x.stride():
        raise ValueError("mix_triton: out must have the same memory layout as x")
    targets = torch.empty((B, num_classes), dtype=torch.float32, device=x.device) if targets is None else targets
    sb, sc, sh, sw = x.stride()
    y0, y1, x0, x1 = p.box
    k["mix"][(triton_cdiv(x.numel(), block),)](x, out, float(p.lam), y0, y1, x0, x1, B, C, H, W,
                                               sb, sc, sh, sw, BLOCK=block)
    off = smoothing / num_classes
    k["targets"][(B,)](y.contiguous(), targets, B, num_classes, float(p.lam_eff), 1.0 - smoothing + off, off,
                       BLOCK_K=k["next_pow2"](num_classes))
    return out, targets


def soft_cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """mean over rows of -sum_k t_k log softmax(z)_k."""
    return -(targets * torch.log_softmax(logits.float(), dim=1)).sum(dim=1).mean()


class _SoftCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, targets):
        k = _kernels()
        logits, targets = logits.contiguous(), targets.contiguous()
        R, K = logits.shape
        loss = torch.empty(R, dtype=torch.float32, device=logits.device)
        lse = torch.empty(R, dtype=torch.float32, device=logits.device)
        k["fwd"][(R,)](logits, targets, loss, lse, K, BLOCK_K=k["next_pow2"](K))
        ctx.save_for_backward(logits, targets, lse)
        return loss.mean()

    @staticmethod
    def backward(ctx, grad_out):
        k = _kernels()
        logits, targets, lse = ctx.saved_tensors
        R, K = logits.shape
        grad = torch.empty_like(logits)
        k["bwd"][(R,)](logits, targets, lse, grad_out.contiguous(), grad, 1.0 / R, K, BLOCK_K=k["next_pow2"](K))
        return grad, None


def soft_cross_entropy_triton(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return _SoftCE.apply(logits, targets)


def mix(x, y, num_classes, p: MixParams, smoothing: float = 0.0):
    if kernels.use_triton(x.device):
        return mix_triton(x, y, num_classes, p, smoothing)
    return mix_ref(x, y, num_classes, p, smoothing)


def soft_cross_entropy(logits, targets):
    if kernels.use_triton(logits.device):
        return soft_cross_entropy_triton(logits, targets)
    return soft_cross_entropy_ref(logits, targets)
