"""End-to-end training images/s on real shards vs synthetic in-memory tensors.

    horovodrun -np 2 -H localhost:2 python -m bench.train [--preset sanity] [--data.train=DIR]
        [--train.steps=30] [--bench.warmup=5]

Same model, same `train_step`, same batch shapes: once fed by the DALI loader from
shards, once from tensors already in memory (made by the same loader beforehand, so
shapes, dtypes and devices match). Reports aggregate images/s for each (one allgather:
total images / slowest rank's time — not rank 0 x size), the loader overhead ratio
real/synthetic (1.0 = the loader costs nothing), and the share of step time spent
waiting for data. Warm-up steps are excluded.
"""
from __future__ import annotations

import itertools
import sys

from bench import report
from bench import slo as S
from hvdtrain.gpumon import GpuMonitor
from data.wds import ShardError, open_shards
from hvdtrain import config as C
from hvdtrain import dist
from hvdtrain import train as T
from hvdtrain.sanity import embedded_data


class InMemoryLoader:
    """Cycles through batches held in memory: the loop's input with no data work."""

    def __init__(self, batches):
        self.batches, self.epoch, self.last_source = batches, 0, "(synthetic, in memory)"

    def forever(self):
        return itertools.cycle(self.batches)


def measure(state: T.TrainState, loader, warmup: int, steps: int, mon: GpuMonitor | None = None) -> T.LoopResult:
    """Warm-up steps, then the timed steps (a LoopResult of the timed ones only); `mon`, if
    given, samples the GPU over the timed steps only."""
    T.run_loop(state, loader, warmup)
    if mon is not None:
        mon.start()
    return T.run_loop(state, loader, steps)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, extra = C.parse_args(argv, default_preset="sanity", extra_flags=("warmup", "run-dir", "slo"))
        slos = S.load(extra.get("slo"))
    except (C.ConfigError, OSError, ValueError) as e:
        print(f"bench.train: {e}", file=sys.stderr)
        return 2
    warmup = int(extra.get("warmup", 3))
    if "--train.steps" not in " ".join(argv):
        cfg.train.steps = 20
    dist.init()
    _, dali_threads = T.configure_threads(cfg)
    if not cfg.data.train:
        cfg.data.train = embedded_data(cfg)
    try:
        shards = open_shards(cfg.data.train)
    except ShardError as e:
        print(f"bench.train: data error: {e}", file=sys.stderr)
        return 2
    state = T.make_state(cfg, shards.num_classes)
    loader = T.open_loader(cfg, shards, dali_threads)
    mon = GpuMonitor(state.device)
    real = T.aggregate_throughput(measure(state, loader, warmup, cfg.train.steps, mon))
    gpu = mon.stop()
    checks = [S.check(slos["gpu_util_pct"], gpu["util_mean_pct"], gpu.get("why", ""))]
    it = loader.forever()
    held = [next(it) for _ in range(cfg.train.grad_accum_steps * 2)]  # same shapes, now in memory
    synth = T.aggregate_throughput(measure(state, InMemoryLoader(held), warmup, cfg.train.steps))
    ratio = real["steady_images_per_s"] / synth["steady_images_per_s"]
    if dist.is_primary():
        lines = [f"bench.train: {cfg.preset} preset, {cfg.train.task}, {dist.size()} rank(s) x "
                 f"{dist.device()}, batch {cfg.train.batch_size} x accum {cfg.train.grad_accum_steps}, "
                 f"{cfg.data.size} px, {cfg.train.steps} steps after {warmup} warm-up",
                 f"{'input':<28} {'img/s (all ranks)':>18} {'data wait':>10}",
                 f"{'real shards (DALI ' + loader.spec.decode + ')':<28} {real['steady_images_per_s']:>18.1f} "
                 f"{100 * real['data_wait_share']:>9.1f}%",
                 f"{'synthetic, in memory':<28} {synth['steady_images_per_s']:>18.1f} "
                 f"{100 * synth['data_wait_share']:>9.1f}%",
                 f"loader overhead ratio real/synthetic: {ratio:.3f}", "",
                 S.table(checks, slos)]
        table = "\n".join(lines)
        print(table)
        timeline = gpu.pop("timeline", None)
        result = report.envelope("train", C.to_dict(cfg), None, ranks=dist.size(), real=real, synthetic=synth,
                                 real_over_synthetic=ratio, data=shards.describe(), warmup_steps=warmup,
                                 gpu=gpu, slos=checks)

        def chart(path):
            import matplotlib.pyplot as plt

            fig, axes = plt.subplots(1, 2 if timeline else 1, figsize=(9 if timeline else 5, 3), dpi=110,
                                     squeeze=False)
            ax = axes[0][0]
            ax.bar(["real shards", "synthetic"], [real["steady_images_per_s"], synth["steady_images_per_s"]])
            ax.set_ylabel("images/s, all ranks")
            ax.set_title(f"real/synthetic {ratio:.3f}", fontsize=9)
            if timeline:
                report.util_axes(axes[0][1], timeline)
            fig.tight_layout()
            fig.savefig(path)
            plt.close(fig)
        report.publish(extra.get("run-dir", ""), "train", result, table, chart)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
