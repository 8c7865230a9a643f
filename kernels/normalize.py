"""uint8 NHWC batch -> normalized, optionally flipped, laid-out model input, in one pass.

On the dali-cpu path DALI hands over uint8 NHWC crops: 4x fewer bytes over PCIe than
float32. This op then does cast, per-channel (x - mean) / std, a horizontal flip per
sample (flag tensor), and writes bf16/fp16/fp32 as NCHW or channels_last. A
memory-bound op: its floor is one read of B*H*W*3 bytes and one write of B*3*H*W*size.
"""
from __future__ import annotations

import torch

from hvdtrain import kernels


def normalize_ref(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, flip: torch.Tensor | None,
                  dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """x: uint8 [B, H, W, 3]; mean/std: [3] (pixel units); flip: bool [B] or None.
    Returns [B, 3, H, W] in `dtype` (channels_last memory format if asked)."""
    y = (x.permute(0, 3, 1, 2).to(torch.float32) - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)
    if flip is not None:
        y = torch.where(flip.view(-1, 1, 1, 1).to(torch.bool), y.flip(3), y)
    y = y.to(dtype)
    return y.contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)


_kernel = None


def _get_kernel():
    global _kernel
    if _kernel is None:
        import triton
        import triton.language as tl

        @triton.jit
        def normalize_kernel(x_ptr, out_ptr, scale_ptr, shift_ptr, flip_ptr, total, H, W,
                             HAS_FLIP: tl.constexpr, CHANNELS_LAST: tl.constexpr, BLOCK: tl.constexpr):
            # one program writes BLOCK consecutive output elements (coalesced writes)
            offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
            mask = offs < total
            if CHANNELS_LAST:  # output memory order b, h, w, c
                c = offs % 3
                w = (offs // 3) % W
                h = (offs // (3 * W)) % H
                b = offs // (3 * W * H)
            else:              # output memory order b, c, h, w
                w = offs % W
                h = (offs // W) % H
                c = (offs // (W * H)) % 3
                b = offs // (3 * W * H)
            if HAS_FLIP:
                f = tl.load(flip_ptr + b, mask=mask, other=0)
                w = tl.where(f != 0, W - 1 - w, w)
            src = ((b * H + h) * W + w) * 3 + c
            v = tl.load(x_ptr + src, mask=mask, other=0).to(tl.float32)
            y = v * tl.load(scale_ptr + c, mask=mask, other=0.0) + tl.load(shift_ptr + c, mask=mask, other=0.0)
            tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)

        _kernel = normalize_kernel
    return _kernel


def normalize_triton(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, flip: torch.Tensor | None,
                     dtype: torch.dtype = torch.float32, channels_last: bool = False,
                     out: torch.Tensor | None = None, block: int = 1024) -> torch.Tensor:
    if x.dtype != torch.uint8 or x.dim() != 4 or x.shape[3] != 3:
        raise ValueError(f"normalize: expected uint8 [B, H, W, 3], got {x.dtype} {list(x.shape)}")
    x = x.contiguous()
    B, H, W, _ = x.shape
    if out is None:
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = torch.empty((B, 3, H, W), dtype=dtype, device=x.device, memory_format=fmt)
    std32 = std.to(device=x.device, dtype=torch.float32)
    scale = (1.0 / std32).contiguous()
    shift = (-mean.to(device=x.device, dtype=torch.float32) / std32).contiguous()
    flip_u8 = flip.to(device=x.device, dtype=torch.uint8).contiguous() if flip is not None else scale  # unused
    total = out.numel()
    grid = (triton_cdiv(total, block),)
    _get_kernel()[grid](x, out, scale, shift, flip_u8, total, H, W, HAS_FLIP=flip is not None,
                        CHANNELS_LAST=channels_last, BLOCK=block)
    return out


def triton_cdiv(a: int, b: int) -> int:
    return (a + b - 1) // b


def normalize(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, flip: torch.Tensor | None,
              dtype: torch.dtype = torch.float32, channels_last: bool = False) -> torch.Tensor:
    """Dispatch: Triton on CUDA, the reference elsewhere (HVDTRAIN_KERNELS overrides)."""
    if kernels.use_triton(x.device):
        return normalize_triton(x, mean, std, flip, dtype, channels_last)
    return normalize_ref(x, mean.to(x.device), std.to(x.device), flip, dtype, channels_last)
