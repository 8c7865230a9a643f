"""What every loader hands the loop: `Batch`, and the conversions loaders share (labels
from `.cls` bytes, range checks, uint8 crops to normalized model input). Loaders live in
`hvdtrain.loader` (DALI, in memory, the factory) and `hvdtrain.torch_loader`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from hvdtrain.pipeline import MEAN, STD


class DataError(RuntimeError):
    """Bad input found while training; the message names the shard and sample."""


@dataclass
class Batch:
    views: list[torch.Tensor]   # each [B, 3, H, W], normalized, on the training device
    labels: torch.Tensor        # [B] int64
    sources: torch.Tensor       # [B, L] uint8: "tar:offset:member" per sample, 0-padded

    def source(self, i: int) -> str:
        return decode_source(self.sources[i])

    def keys(self) -> list[str]:
        """Sample member names (`<key>.<ext>`), for tests and error messages."""
        return [self.source(i).rsplit(":", 1)[-1] for i in range(self.sources.shape[0])]


def dali_reason(e: BaseException) -> str:
    """The informative line of a DALI error: the one after "encountered:", else the first."""
    lines = [x.strip() for x in str(e).splitlines() if x.strip()]
    if "encountered:" in lines and lines.index("encountered:") + 1 < len(lines):
        return lines[lines.index("encountered:") + 1]
    return lines[0] if lines else repr(e)


def decode_source(row: torch.Tensor) -> str:
    return bytes(row.numpy()).rstrip(b"\0").decode(errors="replace")


_DIGIT0, _DIGIT9 = ord("0"), ord("9")
_SPACE = torch.tensor([0, 9, 10, 13, 32], dtype=torch.uint8)  # pad, tab, LF, CR, space


def parse_labels(raw: torch.Tensor, sources: torch.Tensor | None = None, optional: bool = False) -> torch.Tensor:
    """ASCII-decimal `.cls` bytes, padded to [B, W] with zeros -> int64 [B].

    Vectorised; raises DataError naming the sample when a label has a non-digit byte,
    no digits at all, or fills the whole padded width (it may have been cut off).
    """
    raw = raw.to(torch.int64)
    digit = (raw >= _DIGIT0) & (raw <= _DIGIT9)
    space = torch.isin(raw, _SPACE.to(torch.int64))
    missing = (raw == 0).all(dim=1) if optional else torch.zeros(raw.shape[0], dtype=torch.bool)
    bad = (~(digit | space).all(dim=1) | ~digit.any(dim=1) | (raw[:, -1] != 0)) & ~missing
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        where = decode_source(sources[i]) if sources is not None else f"batch row {i}"
        text = bytes(raw[i].to(torch.uint8).numpy()).rstrip(b"\0")
        raise DataError(f"{where}: label {text!r} is not a decimal class index "
                        f"(.cls must be ASCII digits, at most {raw.shape[1] - 1} bytes)")
    value = torch.zeros(raw.shape[0], dtype=torch.int64)
    for j in range(raw.shape[1]):  # W=16 columns: cheap next to decoding a batch
        d = digit[:, j]
        value = torch.where(d, value * 10 + (raw[:, j] - _DIGIT0), value)
    return torch.where(missing, -1, value)  # no .cls member (labels_optional): -1


def check_label_range(labels: torch.Tensor, sources: torch.Tensor, num_classes: int | None, spec: str) -> None:
    if num_classes is not None and labels.numel():
        lo, hi = int(labels.min()), int(labels.max())
        if lo < 0 or hi >= num_classes:
            i = int(((labels < 0) | (labels >= num_classes)).nonzero()[0, 0])
            raise DataError(f"{decode_source(sources[i])}: label {int(labels[i])} out of range "
                            f"[0, {num_classes}) for {spec}")


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor copied to `device` without the host waiting for the copy, whoever owns
    its memory.

    On the CPU-decode path `t` is DALI's memory, not torch's: the pipelines run DALI's
    dynamic executor (the default when `exec_dynamic` is not given, nvidia/dali/pipeline.py),
    and with it DALIGenericIterator hands out `torch.from_dlpack` views of DALI's output
    buffers instead of copies (`copy = not is_exec_dynamic`, nvidia/dali/plugin/pytorch/
    __init__.py, DALI 2.4.0; tests/unit/test_pipeline.py checks the executor). A
    `non_blocking` copy straight from it either blocks the host (pageable memory: the
    driver stages it) or, if DALI pinned it, races with DALI reusing the buffer once the
    view is dropped, since torch records no event for memory it did not allocate. So the
    bytes go through a pinned buffer from torch's caching host allocator: one host memcpy
    (~10 MB at 64 x 224 px: a few ms on one core), and torch keeps that buffer until the
    copy that reads it has finished (it records an event on the stream)."""
    if device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    staged = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
    staged.copy_(t)
    return staged.to(device, non_blocking=True)


def to_model_input(v: torch.Tensor, flip: torch.Tensor | None, device: torch.device, dtype: torch.dtype,
                   channels_last: bool) -> torch.Tensor:
    """uint8 NHWC (a quarter of float32's PCIe bytes) -> normalized NCHW on `device`, flipped
    per sample: Triton on CUDA, the torch reference elsewhere (kernels.normalize). The
    crops reach a GPU through a torch-pinned buffer (`to_device`)."""
    from hvdtrain.kernels.normalize import normalize

    v = to_device(v, device)
    if flip is not None:
        flip = to_device(flip.reshape(-1), device).bool()
    mean, std = _consts(device)
    return normalize(v, mean, std, flip, dtype, channels_last)


_MEAN, _STD = torch.tensor(MEAN), torch.tensor(STD)
_ON_DEVICE: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _consts(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and std on `device`, copied once: a host->device copy per batch would be a
    stream sync per batch on a GPU."""
    if device not in _ON_DEVICE:
        _ON_DEVICE[device] = (_MEAN.to(device), _STD.to(device))
    return _ON_DEVICE[device]
