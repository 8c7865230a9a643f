"""Time each kernel against its torch reference and the plain torch sequence it replaces.

    python -m bench.kernels                      # on a GPU: CUDA events, a size that fills it
    python -m bench.kernels --batch 256 --size 224 --repeats 50

On a GPU it reports median times, bytes moved / time, and that rate as a fraction of the
device's measured copy bandwidth (a large device-to-device copy: read + write bytes).
A memory-bound op's floor is one read of its inputs and one write of its outputs.
With no GPU it times the torch references on the CPU and the Triton kernels under the
interpreter (TRITON_INTERPRET=1) at a small size: interpreter times prove the kernels
run, they are not speeds. Prints a table, then `BENCH_JSON {...}`.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

GPU = torch.cuda.is_available()
if not GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

from hvdtrain import exitmark, provenance  # noqa: E402
from hvdtrain.pipeline import MEAN, STD  # noqa: E402
from hvdtrain.kernels.mixup import (mix_ref, mix_triton, sample_params, soft_cross_entropy_ref,  # noqa: E402
                           soft_cross_entropy_triton)
from hvdtrain.kernels.normalize import normalize_ref, normalize_triton  # noqa: E402


def median_ms(fn, repeats: int, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if GPU:
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            b.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(dev: torch.device) -> float | None:
    if not GPU:
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=dev)
    dst = torch.empty_like(src)
    ms = median_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / ms / 1e6  # read + write, GB/s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.kernels", description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=256 if GPU else 4)
    p.add_argument("--size", type=int, default=224 if GPU else 32)
    p.add_argument("--classes", type=int, default=1000)
    p.add_argument("--repeats", type=int, default=50 if GPU else 3)
    a = p.parse_args(argv)
    dev = torch.device("cuda" if GPU else "cpu")
    B, S, K = a.batch, a.size, a.classes
    g = torch.Generator().manual_seed(0)
    x8 = torch.randint(0, 256, (B, S, S, 3), dtype=torch.uint8, generator=g)
    x8_host = x8.pin_memory() if GPU else x8
    x8 = x8.to(dev)
    mean, std = torch.tensor(MEAN, device=dev), torch.tensor(STD, device=dev)
    flip = (torch.rand(B, generator=g) < 0.5).to(dev)
    f32_host = normalize_ref(x8_host, mean.cpu(), std.cpu(), flip.cpu())
    f32_host = f32_host.pin_memory() if GPU else f32_host
    xf = torch.randn(B, 3, S, S, generator=g).to(dev)
    y = torch.randint(0, K, (B,), generator=g).to(dev)
    params = sample_params(S, S, 0.0, 1.0, 0.5, g)
    logits = torch.randn(B, K, generator=g).to(dev).requires_grad_()
    t = torch.softmax(torch.randn(B, K, generator=g), 1).to(dev)

    def ce(fn):
        def run():
            logits.grad = None
            fn(logits, t).backward()
        return run

    label = "triton" if GPU else "triton (interpreter)"
    rows = [  # name, impl, fn, bytes moved (floor)
        # the sequence it replaces: DALI normalizes on the host, float32 crosses PCIe
        ("normalize", "plain: float32 H2D copy" if GPU else "plain: float32 copy (clone)",
         (lambda: f32_host.to(dev, non_blocking=True)) if GPU else f32_host.clone, B * 3 * S * S * 4),
        ("normalize", "torch ref (uint8 in)", lambda: normalize_ref(x8, mean, std, flip), B * 3 * S * S * 5),
        ("normalize", label, lambda: normalize_triton(x8, mean, std, flip), B * 3 * S * S * 5),
        ("mix", "torch ref", lambda: mix_ref(xf, y, K, params, 0.1), B * 3 * S * S * 8),
        ("mix", label, lambda: mix_triton(xf, y, K, params, 0.1), B * 3 * S * S * 8),
        ("soft CE fwd+bwd", "torch ref", ce(soft_cross_entropy_ref), B * K * 4 * 4),
        ("soft CE fwd+bwd", label, ce(soft_cross_entropy_triton), B * K * 4 * 4),
    ]
    bw = copy_bandwidth_gbs(dev)
    results = []
    print(f"device {torch.cuda.get_device_name(0) if GPU else 'cpu (no GPU: interpreter times are not speeds)'}"
          f"; batch {B}, {S}x{S}, {K} classes; median of {a.repeats}")
    if bw:
        print(f"measured device copy bandwidth: {bw:.0f} GB/s (read + write)")
    print(f"{'op':<16} {'implementation':<26} {'median ms':>10} {'GB/s':>8} {'of copy bw':>10}")
    for op, impl, fn, nbytes in rows:
        ms = median_ms(fn, a.repeats, warmup=1 if not GPU else 3)
        gbs = nbytes / ms / 1e6
        frac = f"{gbs / bw:.2f}" if bw else "-"
        print(f"{op:<16} {impl:<26} {ms:>10.3f} {gbs:>8.1f} {frac:>10}")
        results.append({"op": op, "impl": impl, "median_ms": ms, "bytes": nbytes, "gb_s": gbs,
                        "fraction_of_copy_bw": gbs / bw if bw else None})
    code = provenance.code_state()
    print("BENCH_JSON " + json.dumps({"bench": "kernels", "results": results, "copy_bw_gb_s": bw,
                                     "config": vars(a), "versions": provenance.versions(),
                                     "interpreter": not GPU, "git_sha": code["git_sha"],
                                     "device": torch.cuda.get_device_name(0) if GPU else "cpu", "error": None}))
    return 0


if __name__ == "__main__":
    sys.exit(exitmark.mark(main()))
