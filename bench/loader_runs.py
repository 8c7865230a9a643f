"""The loaders as `bench.loader` and `bench.loader --tune` run them: each built from the
config the training uses, timed over windows after a warm-up, with the CPU cores it used.
See bench/loader.py for what each loader is and what the figures mean.
"""
from __future__ import annotations

import io
import statistics
import time

import numpy as np
import psutil
import torch

from hvdtrain.data.wds import Sample, write_split
from hvdtrain import config as C
from hvdtrain import pipeline
from hvdtrain.loader import DaliLoader
from hvdtrain.synthetic import SyntheticLoader


def make_imagenet_like(out: str, n: int, seed: int = 0, shard_size: int = 256) -> str:
    """n JPEGs of 500x375 (quality 90) with smooth structure plus noise: ImageNet-sized,
    in shards of `shard_size`."""
    from PIL import Image

    from hvdtrain.data.synth import jpeg_bytes

    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:375, 0:500].astype(np.float32)

    def gen():
        for i in range(n):
            f = rng.uniform(0.005, 0.05, size=(3, 2))
            img = np.stack([127 + 100 * np.sin(xx * f[c, 0] + yy * f[c, 1] + rng.uniform(0, 6)) for c in range(3)], -1)
            img += rng.normal(0, 20, img.shape)
            yield Sample(f"img{i:06d}", jpeg_bytes(Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), 90),
                         int(rng.integers(0, 1000)))
    write_split(gen(), out, [str(i) for i in range(1000)], "bench", shard_size=shard_size,
                extra={"source": "bench.loader synthetic 500x375", "shuffled": True})  # random labels
    return out


def bench_config(a, threads: int, gpu: bool, hw_load: float | None = None, prefetch: int | None = None) -> C.Config:
    """The training config these loaders stand for: one view, the crop and batch asked for."""
    cfg = C.Config(preset="bench")
    cfg.train.task, cfg.train.batch_size, cfg.seed = "classify", a.batch_size, a.seed
    d = cfg.data
    d.size, d.min_scale, d.threads, d.shuffle_buffer = a.size, a.min_scale, threads, 256
    d.decode, d.prefetch = ("mixed" if gpu else "cpu"), (prefetch or a.prefetch)
    d.window_shards = getattr(a, "window_shards", 0)
    if hw_load is not None:
        d.hw_decoder_load = hw_load
    return cfg


def spec_for(a, shards, threads: int, gpu: bool, hw_load=None, prefetch=None) -> pipeline.PipeSpec:
    """The spec training would use on these shards: `gpu` = mixed decode. On a GPU node CPU
    decode feeds the GPU too (device_id 0), so normalize=auto picks the kernel path there,
    as training does. The shards' own `shuffled` flag goes in as training passes it
    (loader.from_config): without it `shard_shuffle=auto` would interleave shards written
    shuffled, and rebuild the pipeline at every epoch end, inside the timed windows."""
    device_id = 0 if (gpu or torch.cuda.is_available()) else None
    return pipeline.spec_from_config(bench_config(a, threads, gpu, hw_load, prefetch), "train",
                                     device_id=device_id, threads=threads, written_shuffled=shards.shuffled,
                                     remote=shards.is_remote)


def pil_decode_batches(shards, batch_size: int):
    """Bare full decode with PIL, one core, bytes already in memory: no I/O, no augmentation."""
    from PIL import Image

    from hvdtrain.data.wds import iter_samples

    blobs = [c[e] for p in shards.paths[:2] for _, c in iter_samples(p) for e in c if e != "cls"]
    i = 0
    while True:
        for _ in range(batch_size):
            Image.open(io.BytesIO(blobs[i % len(blobs)])).convert("RGB")
            i += 1
        yield None


def ceiling_batches(shards, spec: pipeline.PipeSpec):
    """The ceiling: the loader's reader and decoder call (same seed: same crops), nothing after."""
    pipe = pipeline.build(shards, pipeline.ceiling_of(spec))
    while True:
        out = pipe.run()
        if spec.decode == "mixed":
            out[0].as_cpu()  # one pixel per image: waits for the GPU work of this batch
        yield None


def no_rebuilds() -> int:
    return 0


def make_iter(name: str, shards, a, threads: int, hw_load=None, prefetch=None):
    """(batch iterator, rebuilds) for loader `name` at one setting, or a reason it is
    skipped (str). `rebuilds()`: pipeline rebuilds so far (the DALI loader with
    shard_shuffle builds a new pipeline for every epoch; no other loader rebuilds: the
    torch DataLoader's workers persist)."""
    gpu = name.endswith("gpu")
    if gpu and not torch.cuda.is_available():
        return "no GPU"
    if name == "pil-decode":
        return pil_decode_batches(shards, a.batch_size), no_rebuilds
    device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")  # where training runs
    if name == "synthetic":
        loader = SyntheticLoader(bench_config(a, threads, False), shards.num_classes, 0, device)
        return (b.views[0] for b in loader.forever()), no_rebuilds
    spec = spec_for(a, shards, threads, gpu, hw_load, prefetch)
    if name.startswith("ceiling"):
        return ceiling_batches(shards, spec), no_rebuilds
    if name == "torch":
        from hvdtrain.torch_loader import TorchLoader

        return (b.views[0] for b in TorchLoader(shards, spec, device=device, workers=threads).forever()), no_rebuilds
    loader = DaliLoader(shards, spec, device=device)
    return (b.views[0] for b in loader.forever()), ((lambda: loader.epoch) if spec.shard_shuffle else no_rebuilds)


def time_batches(it, batch_size: int, warmup: int, windows: int, window_batches: int,
                 rebuilds=no_rebuilds) -> tuple[list[float], float, list[int]]:
    """(images/s of each timed window, CPU cores used on average, pipeline rebuilds inside
    each window) after `warmup` batches."""
    for _ in range(warmup):
        next(it)
    me = psutil.Process()
    rates, rebuilt, cpu0, wall0 = [], [], _cpu_s(me), time.perf_counter()
    for _ in range(windows):
        n0, t0 = rebuilds(), time.perf_counter()
        for _ in range(window_batches):
            b = next(it)
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        rates.append(window_batches * batch_size / (time.perf_counter() - t0))
        rebuilt.append(rebuilds() - n0)
    cores = (_cpu_s(me) - cpu0) / max(time.perf_counter() - wall0, 1e-9)
    del b
    return rates, cores, rebuilt


def _cpu_s(p: psutil.Process) -> float:
    """CPU seconds of this process and its children (DataLoader workers)."""
    t = p.cpu_times()
    total = t.user + t.system
    for c in p.children(recursive=True):
        try:
            ct = c.cpu_times()
            total += ct.user + ct.system
        except psutil.Error:
            pass
    return total


def run_one(name: str, shards, a, threads: int, hw_load=None, prefetch=None, windows=None) -> dict:
    """One loader at one setting: median images/s of the timed windows, CPU cores used,
    and the pipeline rebuilds that fell inside them (`rebuilds_in_windows`, and per window
    in `window_rebuilds`). KeyboardInterrupt is not caught: it ends the sweep."""
    from hvdtrain.gpumon import GpuMonitor

    try:
        made = make_iter(name, shards, a, threads, hw_load, prefetch)
        if isinstance(made, str):
            return {"img_s": None, "skipped": made}
        it, rebuilds = made
        mon = GpuMonitor(torch.device("cuda", 0) if name.endswith("gpu") else None)
        windows = windows or a.windows
        if a.seconds:  # calibrate the window count from one window's rate
            first = time_batches(it, a.batch_size, a.warmup, 1, a.window_batches, rebuilds)[0][0]
            windows = max(3, int(a.seconds * first / (a.batch_size * a.window_batches)))
        else:
            for _ in range(a.warmup):
                next(it)
        mon.start()
        try:
            rates, cores, rebuilt = time_batches(it, a.batch_size, 0, windows, a.window_batches, rebuilds)
        finally:  # also on SIGINT: no sampler thread or nvidia-smi dmon left behind
            gpu = mon.stop()
        gpu.pop("timeline", None)
        del it, rebuilds
        return {"img_s": statistics.median(rates), "windows": rates, "cpu_cores_used": cores, "gpu": gpu,
                "rebuilds_in_windows": sum(rebuilt), "window_rebuilds": rebuilt}
    except Exception as e:  # noqa: BLE001 - one loader failing must not hide the others
        return {"img_s": None, "error": f"{e.__class__.__name__}: {e}"}
