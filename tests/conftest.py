"""Shared fixtures: small real shard sets made from real JPEGs."""
from __future__ import annotations

import os
import sys

import numpy as np
import pytest
from PIL import Image

import torch  # noqa: E402 (before triton: decides whether Triton must interpret)

# Triton kernels run on the CPU through the interpreter where there is no GPU; the
# variable must be set before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from hvdtrain.data import synth  # noqa: E402
from hvdtrain.data.wds import Sample, write_split  # noqa: E402


def jpeg(seed: int, size: int = 32) -> bytes:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 255, size=(size, size, 3), dtype=np.uint8)
    return synth.jpeg_bytes(Image.fromarray(arr))


def unique_shards(out: str, n: int, shard_size: int, classes: int = 10, size: int = 32) -> dict:
    """n samples with keys u0000000.. and label = index % classes."""
    samples = (Sample(f"u{i:07d}", jpeg(i, size), i % classes) for i in range(n))
    return write_split(samples, out, [str(c) for c in range(classes)], "train", shard_size)


@pytest.fixture
def preempt_handlers():
    """hvdtrain.preempt's handlers (SIGUSR1/SIGTERM only recorded) for one test; the
    process's own handlers are put back after it."""
    import signal

    from hvdtrain import preempt as P

    old = {s: signal.getsignal(s) for s in P.SIGNALS}
    P._received.clear()
    P.install()
    yield
    for s, h in old.items():
        signal.signal(s, h)
    P._received.clear()


@pytest.fixture(scope="session")
def synth_data(tmp_path_factory) -> str:
    root = str(tmp_path_factory.mktemp("synth"))
    synth.make(root, classes=10, train=256, val=64, size=64, seed=7, shard_size=100)
    return root


def pytest_sessionstart(session):
    """HVDTRAIN_REQUIRE_GPU=1: GPU paths must really run, not skip or fall back."""
    if os.environ.get("HVDTRAIN_REQUIRE_GPU") == "1" and not torch.cuda.is_available():
        raise pytest.UsageError("HVDTRAIN_REQUIRE_GPU=1 but torch sees no CUDA device")
