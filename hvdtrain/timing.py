"""Where the step time goes, and what to do about it.

The loop marks phase boundaries; the time between two marks belongs to the later mark's
phase:

    data_wait   blocked on the loader for the step's micro-batches (incl. the loader's
                own host->device copy and normalize on the kernel path)
    h2d         the step moving views and labels to the device
    fwd_bwd     forward + backward of every micro-batch (with AMP's scaling)
    allreduce   waiting for Horovod's gradient allreduce (`synchronize()`)
    optimizer   unscale, clip, step, zero_grad, schedule
    other       the loop's own overhead between steps (logging)

On a GPU the marks are CUDA events on the current stream, read only at log points (which
sync anyway): no extra host syncs. The gaps they measure are device time, so a starved GPU
shows as data_wait. On the CPU they are `perf_counter` readings. Validation passes and
checkpoints between steps are excluded (they are reported on their own lines).

`diagnose()` turns the shares into a verdict (data-bound, compute-bound, ...) with the
dominant phase, its share and one concrete next step.
"""
from __future__ import annotations

import statistics
import time

import torch

PHASES = ("data_wait", "h2d", "fwd_bwd", "allreduce", "optimizer", "other")
BOUND = {"data_wait": "data-bound", "h2d": "copy-bound", "fwd_bwd": "compute-bound",
         "allreduce": "communication-bound", "optimizer": "optimizer-bound", "other": "host-bound"}


class StepClock:
    """Phase marks for one rank. `mark(phase)` closes the current phase; `skip()` starts a
    new origin without counting the time since the last mark (hooks between steps);
    `collect()` (at a log point) returns seconds per phase since the last collect."""

    def __init__(self, device: torch.device | None = None):
        self.cuda = device is not None and device.type == "cuda"
        self._marks: list[tuple[str | None, object]] = []
        self.skip()

    def _now(self):
        if self.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()  # enqueued on the current stream: no host sync
            return e
        return time.perf_counter()

    def mark(self, phase: str) -> None:
        self._marks.append((phase, self._now()))

    def skip(self) -> None:
        self._marks.append((None, self._now()))

    def collect(self) -> dict[str, float]:
        """Seconds per phase since the previous collect. On CUDA this waits for the last
        event; called at log points, after the log's device->host copy, so it is done."""
        out = dict.fromkeys(PHASES, 0.0)
        marks = self._marks
        if self.cuda and len(marks) > 1:
            marks[-1][1].synchronize()
        for (_, a), (phase, b) in zip(marks, marks[1:]):
            if phase is not None:
                out[phase] += (a.elapsed_time(b) / 1e3) if self.cuda else (b - a)
        self._marks = marks[-1:]  # the last mark is the next interval's origin
        return out


class NoClock:
    """A clock that measures nothing (a step run outside the loop, e.g. in tests)."""

    def mark(self, phase: str) -> None:
        pass

    def skip(self) -> None:
        pass


def add(total: dict[str, float], part: dict[str, float]) -> dict[str, float]:
    for k, v in part.items():
        total[k] = total.get(k, 0.0) + v
    return total


def shares(seconds: dict[str, float]) -> dict[str, float]:
    total = sum(seconds.values())
    return {k: (v / total if total > 0 else 0.0) for k, v in seconds.items()}


def next_step(dominant: str, ctx: dict) -> str:
    """One concrete thing to try, given the dominant phase and the run's settings."""
    gpu, threads, cores = ctx.get("gpu", False), ctx.get("dali_threads"), ctx.get("cores_per_rank")
    if dominant == "data_wait":
        if threads is not None and cores is not None and threads < cores:
            return f"raise --data.threads (now {threads}; this rank has {cores} cores)"
        if gpu and ctx.get("decode") == "mixed":
            return ("send more JPEGs to the hardware decoder (--data.hw_decoder_load; `bench.loader --tune` "
                    "picks it), or train on smaller images (--data.size)")
        return (f"the loader has every core of this rank ({cores}): give each rank more cores "
                f"(fewer ranks per node), use mixed decode on a GPU, or smaller images (--data.size)")
    if dominant == "fwd_bwd":
        if gpu:
            return ("the GPU computes most of the step: raise --train.batch_size to fill it, and use "
                    "--train.amp=bf16 and --data.channels_last=True")
        return "the step is compute on the CPU, as expected with no GPU; a GPU is the next step"
    if dominant == "allreduce":
        return ("raise --train.grad_accum_steps (fewer allreduces per image), try --train.fp16_allreduce=True, "
                "and check the interconnect with bench.allreduce")
    if dominant == "h2d":
        return "keep --data.normalize=kernel (uint8 over PCIe, a quarter of float32's bytes)"
    if dominant == "optimizer":
        return "raise --train.grad_accum_steps: the optimizer step is paid once per accumulated batch"
    return "raise --train.log_every: the loop's overhead between steps dominates"


def diagnose(seconds: dict[str, float], ctx: dict | None = None) -> dict:
    """The verdict for a breakdown: dominant phase, its share, the bound and the next step."""
    sh = shares(seconds)
    if not seconds or sum(seconds.values()) <= 0:
        return {"seconds": seconds, "shares": sh, "dominant": None, "share": None, "bound": "not measured",
                "next_step": "no step was timed"}
    dominant = max(sh, key=sh.get)
    return {"seconds": seconds, "shares": sh, "dominant": dominant, "share": sh[dominant], "bound": BOUND[dominant],
            "next_step": next_step(dominant, ctx or {})}


STRAGGLER_RATIO = 1.3  # a rank this much busier than the median of the others is named


def straggler(busy_s: list[float], wait_s: list[float], placement: list[dict]) -> dict | None:
    """The slowest rank, from every rank's busy seconds (its step but the allreduce wait)
    summed over the log intervals, if it is STRAGGLER_RATIO times busier than the median
    of the others: they then wait for it in the allreduce. None with one rank or none."""
    if len(busy_s) < 2 or max(busy_s) <= 0:
        return None
    slow = max(range(len(busy_s)), key=busy_s.__getitem__)
    median = statistics.median(b for i, b in enumerate(busy_s) if i != slow)
    if busy_s[slow] < STRAGGLER_RATIO * max(median, 1e-9):
        return None
    node = next((p["node"] for p in placement if p["rank"] == slow), "?")
    return {"rank": slow, "node": node, "busy_s": busy_s[slow], "others_busy_s": median,
            "others_wait_s": statistics.median(w for i, w in enumerate(wait_s) if i != slow),
            "ratio": busy_s[slow] / max(median, 1e-9)}


def describe(d: dict) -> str:
    """One line: 'data-bound: data_wait 61.2 % of step time (h2d 0.1 %, ...); next: ...',
    and the straggler if one was found."""
    if d.get("dominant") is None:
        return f"step time: {d['bound']}"
    parts = ", ".join(f"{k} {100 * v:.1f} %" for k, v in d["shares"].items())
    line = f"{d['bound']}: {d['dominant']} {100 * d['share']:.1f} % of step time ({parts}); next: {d['next_step']}"
    s = d.get("straggler")
    if s:
        line += (f"; waiting on a peer: rank {s['rank']} on {s['node']} is the straggler (busy {s['busy_s']:.2f} s, "
                 f"{s['ratio']:.1f}x the others' {s['others_busy_s']:.2f} s; they waited {s['others_wait_s']:.2f} s "
                 f"in the allreduce)")
    return line
