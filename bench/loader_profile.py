"""Where the CPU loader's cores go: one stage added at a time, in one run.

    python -m bench.loader_profile [--data DIR] [--threads 2] [--batch-size 64] [--size 224]

Each row is a DALI pipeline (CPU backend) that does one more stage than the row above,
timed over `--batches` batches after a warm-up, with the CPU time the process used:
read + ROI decode (the ceiling), + libjpeg-turbo's fast IDCT, + the resize to the crop
size (antialiased, then not), + label and source pads, + DALI's normalize, and then the
whole `DaliLoader` as training uses it, with normalize in DALI's threads or on the
training thread (`normalize=kernel`, the torch reference on a CPU). `ms/img/core` is CPU
milliseconds per image: the cost of that row's work. Prints the table and one last line
`BENCH_JSON {...}`; docs/benchmarks.md has a run of it beside `perf` and `bench.loader`.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time

import psutil

from hvdtrain.bench import report
from hvdtrain.bench.loader_runs import bench_config, make_imagenet_like
from hvdtrain.data.shards import open_shards
from hvdtrain.data.wds import LABEL_WIDTH
from hvdtrain import pipeline
from hvdtrain.loader import DaliLoader


def _time(step, n: int, batch: int) -> tuple[float, float]:
    """(images/s, CPU cores used) over n calls of `step` (one batch each)."""
    me = psutil.Process()
    c0, t0 = sum(me.cpu_times()[:2]), time.perf_counter()
    for _ in range(n):
        step()
    dt = time.perf_counter() - t0
    return n * batch / dt, (sum(me.cpu_times()[:2]) - c0) / dt


def stage_pipeline(shards, a, stage: int):
    """A CPU pipeline doing the first `stage` stages (1 = ROI decode only)."""
    from nvidia.dali import fn, pipeline_def, types

    @pipeline_def(batch_size=a.batch_size, num_threads=a.threads, device_id=None, seed=a.seed, prefetch_queue_depth=2)
    def p():
        images, labels = fn.readers.webdataset(paths=shards.paths, index_paths=shards.index_paths, ext=["jpg", "cls"],
                                               random_shuffle=True, initial_fill=256, pad_last_batch=True,
                                               name="Reader")
        x = fn.decoders.image_random_crop(images, device="cpu", output_type=types.RGB, random_area=(a.min_scale, 1.0),
                                          use_fast_idct=stage >= 2)
        if stage <= 2:
            return fn.crop(x, crop=(1, 1))
        x = fn.resize(x, size=(a.size, a.size), antialias=stage == 3)
        if stage <= 4:
            return x
        pads = (fn.pad(labels, fill_value=0, shape=[LABEL_WIDTH]),
                fn.pad(fn.get_property(images, key="source_info"), fill_value=0))
        if stage == 5:
            return (x, *pads)
        return (fn.crop_mirror_normalize(x, mirror=fn.random.coin_flip(), dtype=types.FLOAT, output_layout="CHW",
                                         mean=pipeline.MEAN, std=pipeline.STD), *pads)
    pipe = p()
    pipe.build()
    return pipe


STAGES = ["read + ROI decode (the ceiling)", "+ fast IDCT", "+ resize, antialiased", "+ resize, no antialias",
          "+ label and source pads", "+ normalize in DALI"]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.loader_profile", description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="shards (default: 512 synthetic 500x375 JPEGs)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--min-scale", type=float, default=0.25)
    p.add_argument("--batches", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--run-dir", default="")
    a = p.parse_args(argv)
    a.prefetch = 2
    tmp = None
    if not a.data:
        tmp = tempfile.TemporaryDirectory(prefix="hvdtrain-profile-")
        a.data = make_imagenet_like(tmp.name, 512, a.seed)
    shards = open_shards(a.data)
    rows = []
    for i, name in enumerate(STAGES, start=1):
        pipe = stage_pipeline(shards, a, i)
        for _ in range(3):
            pipe.run()
        rows.append((name, *_time(pipe.run, a.batches, a.batch_size)))
        del pipe
    spec = pipeline.spec_from_config(bench_config(a, a.threads, False), "train", threads=a.threads,
                                     written_shuffled=shards.shuffled)  # as training reads them
    for norm in ("dali", "kernel"):
        it = DaliLoader(shards, dataclasses.replace(spec, normalize=norm)).forever()
        for _ in range(3):
            next(it)
        what = "DALI's threads" if norm == "dali" else "the training thread (torch reference)"
        rows.append((f"DaliLoader, normalize in {what}", *_time(lambda: next(it), a.batches, a.batch_size)))
        del it
    print(f"loader profile: {shards.total} images from {a.data}, batch {a.batch_size}, crop {a.size}, "
          f"{a.threads} DALI thread(s)")
    print(f"{'stage':<58} {'img/s':>8} {'cores':>6} {'ms/img/core':>12}")
    out = []
    for name, img_s, cores in rows:
        ms = 1e3 * cores / img_s
        out.append({"stage": name, "img_s": img_s, "cpu_cores_used": cores, "cpu_ms_per_img": ms})
        print(f"{name:<58} {img_s:>8.1f} {cores:>6.2f} {ms:>12.3f}")
    print(report.last_line(report.envelope("loader_profile", dict(vars(a)), None, stages=out)), flush=True)
    if tmp is not None:
        tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
