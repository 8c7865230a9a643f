"""Horovod allreduce: time, algorithm bandwidth and bus bandwidth over message sizes.

    horovodrun -np 2 -H localhost:2 python -m bench.allreduce [--min-kib 4] [--max-mib 256]

Float32 messages from 4 KiB to 256 MiB (x4 steps), each with and without Horovod's fp16
compression. Time = the slowest rank's median over repeats (every rank's times are
gathered). algbw = bytes / time; busbw = algbw * 2(n-1)/n, the bytes each link carries
in a ring allreduce (comparable across rank counts, NCCL-tests' convention). With fp16
compression the bandwidths still count the float32 bytes the caller reduced.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from hvdtrain.bench import report
from hvdtrain import dist


def time_allreduce(nbytes: int, fp16: bool, repeats: int) -> float:
    t = torch.ones(nbytes // 4, dtype=torch.float32, device=dist.device())
    for _ in range(2):  # warm-up: buffers, fusion, connections
        dist.allreduce_mean(t, name=f"ar.{nbytes}.{fp16}", fp16=fp16)
    times = []
    for _ in range(repeats):
        dist.barrier()
        if t.is_cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        dist.allreduce_mean(t, name=f"ar.{nbytes}.{fp16}", fp16=fp16)  # returns when done
        if t.is_cuda:
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    mine = torch.tensor([[statistics.median(times)]], dtype=torch.float64)
    return float(dist.allgather(mine, name=f"ar.t.{nbytes}.{fp16}").max())


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.allreduce", description=__doc__.split("\n\n")[0])
    p.add_argument("--min-kib", type=int, default=4)
    p.add_argument("--max-mib", type=int, default=256)
    p.add_argument("--repeats", type=int, default=10, help="timed allreduces per size (fewer above 16 MiB)")
    p.add_argument("--run-dir", default="")
    a = p.parse_args(argv)
    dist.init()
    n = dist.size()
    sizes, s = [], a.min_kib * 1024
    while s <= a.max_mib * 2**20:
        sizes.append(s)
        s *= 4
    rows = []
    for nbytes in sizes:
        reps = a.repeats if nbytes <= 16 * 2**20 else max(3, a.repeats // 3)
        for fp16 in (False, True):
            sec = time_allreduce(nbytes, fp16, reps)
            alg = nbytes / sec / 1e9
            rows.append({"bytes": nbytes, "fp16": fp16, "time_ms": sec * 1e3, "algbw_gb_s": alg,
                         "busbw_gb_s": alg * 2 * (n - 1) / n, "repeats": reps})
    if dist.is_primary():
        lines = [f"allreduce over {n} rank(s), {dist.device()}, float32, Horovod {'Gloo' if not torch.cuda.is_available() else 'NCCL'}",
                 f"{'size':>10} {'fp16':>5} {'time ms':>10} {'algbw GB/s':>11} {'busbw GB/s':>11}"]
        for r in rows:
            size = f"{r['bytes'] / 2**20:g} MiB" if r["bytes"] >= 2**20 else f"{r['bytes'] // 1024} KiB"
            lines.append(f"{size:>10} {'yes' if r['fp16'] else 'no':>5} {r['time_ms']:>10.3f} "
                         f"{r['algbw_gb_s']:>11.3f} {r['busbw_gb_s']:>11.3f}")
        table = "\n".join(lines)
        print(table)
        result = report.envelope("allreduce", vars(a), None, ranks=n, results=rows)

        def chart(plt):
            fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
            for fp16 in (False, True):
                pts = [r for r in rows if r["fp16"] == fp16]
                ax.plot([r["bytes"] for r in pts], [r["busbw_gb_s"] for r in pts], marker="o",
                        label="fp16 compression" if fp16 else "float32")
            ax.set_xscale("log", base=2)
            ax.set_xlabel("message bytes")
            ax.set_ylabel("bus bandwidth GB/s")
            ax.set_title(f"Horovod allreduce, {n} ranks", fontsize=9)
            ax.legend()
            ax.grid(alpha=0.3)
            return fig
        report.publish(a.run_dir, "allreduce", result, table, chart)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
