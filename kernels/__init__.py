"""Triton kernels for the step's unfused hot spots, each beside its plain-torch reference.

Every op has `<op>_ref` (plain torch: the definition of correct) and `<op>_triton`.
`use_triton(device)` picks Triton for CUDA tensors and the reference elsewhere;
HVDTRAIN_KERNELS=ref|triton forces one (triton on a CPU tensor needs TRITON_INTERPRET=1,
which is how the tests run the kernels on machines with no GPU).
"""
from __future__ import annotations

import os

import torch


def mode() -> str:
    m = os.environ.get("HVDTRAIN_KERNELS", "auto")
    if m not in ("auto", "ref", "triton"):
        raise ValueError(f"HVDTRAIN_KERNELS must be auto, ref or triton, not {m!r}")
    return m


def use_triton(device: torch.device) -> bool:
    m = mode()
    if m == "auto":
        return device.type == "cuda"
    if m == "triton" and device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError("HVDTRAIN_KERNELS=triton on a CPU tensor needs TRITON_INTERPRET=1 "
                           "(set before triton is first imported)")
    return m == "triton"


def describe(device: torch.device) -> str:
    """Which implementation the dispatcher picks on `device`, for banners and reports."""
    if not use_triton(device):
        return "torch reference"
    return "triton (interpreter)" if os.environ.get("TRITON_INTERPRET") == "1" else "triton"
