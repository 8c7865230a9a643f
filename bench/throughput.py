"""End-to-end training images/s on real shards vs synthetic batches made on the device.

    horovodrun -np 2 -H localhost:2 python -m bench.throughput [--preset sanity] [--data.train=DIR]
        [--train.steps=20] [--warmup=3] [--run-dir=DIR] [--slo=FILE]
    horovodrun -np 2 -H localhost:2 python -m bench.throughput --data.loader=synthetic   # both rows synthetic

The run is a `session.Run` (the same set-up as training and the sanity: banner, lock,
loaders, GPU monitor), driven twice over the same model and `train_step`: once fed by
the run's loader (shards, or `--data.loader=synthetic`), once from synthetic batches of
the same shapes, dtypes and device with no reader (`hvdtrain.synthetic`: what
`--data.loader=synthetic` trains on). `--warmup` steps come first each
time and are not timed; the GPU is sampled over the timed steps. Reports aggregate
images/s for each (one allgather: total images / slowest rank's time — not rank 0 x
size), the loader overhead ratio real/synthetic (1.0 = the loader costs nothing), the
share of step time spent waiting for data, and where the step time goes with its
verdict (`hvdtrain.timing`). `--train.steps` defaults to 20 here.
"""
from __future__ import annotations

import sys

from hvdtrain.bench import report
from hvdtrain import config as C
from hvdtrain import dist, exitmark, exits, session, step, timing
from hvdtrain import report as R
from hvdtrain import slo as S
from hvdtrain.synthetic import SyntheticLoader
from hvdtrain.data import embedded


def table(cfg, run, loader: str, real, synth, ratio, warmup, checks, slos) -> str:
    first = ("synthetic (--data.loader)" if cfg.data.loader == "synthetic"
             else "real shards (" + loader.split(",")[0] + ")")
    return "\n".join([
        f"bench.throughput: {cfg.preset} preset, {cfg.train.task}, {cfg.model.name}, {dist.size()} rank(s) x "
        f"{dist.device()}, batch {cfg.train.batch_size} x accum {cfg.train.grad_accum_steps}, {cfg.data.size} px, "
        f"amp {run.state.amp or 'off'}, channels_last {cfg.data.channels_last}, {cfg.train.steps} steps after "
        f"{warmup} warm-up",
        f"{'input':<30} {'img/s (all ranks)':>18} {'data wait':>10}",
        f"{first:<30} {real['steady_images_per_s']:>18.1f} "
        f"{100 * real['data_wait_share']:>9.1f}%",
        f"{'synthetic, no reader':<30} {synth['steady_images_per_s']:>18.1f} {100 * synth['data_wait_share']:>9.1f}%",
        f"loader overhead ratio real/synthetic: {ratio:.3f}" if cfg.data.loader != "synthetic" else
        f"ratio of the two synthetic rows: {ratio:.3f} (the same input twice: the spread between measurements)",
        f"step time ({'real' if cfg.data.loader != 'synthetic' else 'synthetic'}): "
        f"{timing.describe(real['breakdown'])}",
        "", S.table(checks, slos)])


def measure(run: session.Run, loader, warmup: int, steps: int) -> tuple[step.LoopResult, dict]:
    """A window of `run`: `warmup` steps, then `steps` timed ones with the GPU sampled (no
    validation, no checkpoints). Returns the timed steps' result and the GPU's."""
    beat = lambda st: run.dog.beat(f"bench step {st.step}")  # noqa: E731
    run.dog.start()
    try:
        step.run_loop(run.state, loader, warmup, on_step=beat)
        run.start_gpu(fresh=True)
        res = step.run_loop(run.state, loader, steps, on_step=beat)
    finally:
        run.dog.stop()
        gpu = run.stop_gpu()  # also when a step raised: no sampler thread or dmon left behind
    return res, gpu


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        cfg, extra = C.parse_args(argv, default_preset="sanity", extra_flags=("warmup", "run-dir", "slo"),
                                  defaults={"train.steps": "20", "run.progress": "False", "run.tensorboard": "False"})
        slos = S.load(extra.get("slo"))
        warmup = int(extra.get("warmup", 3))
    except (C.ConfigError, OSError, ValueError) as e:
        print(f"bench.throughput: {e}", file=sys.stderr)
        return exits.REFUSED
    dist.init()
    if not cfg.data.train and cfg.data.loader != "synthetic":
        cfg.data.train = embedded.ensure(cfg.seed)
    cfg.run.dir, cfg.run.name = cfg.run.dir or extra.get("run-dir", ""), "bench-train"
    out: dict = {}

    def go() -> int:
        with session.Run(cfg, checkpoints=False) as run:
            res, gpu = measure(run, run.loader, warmup, cfg.train.steps)
            real = run.summarise(res)
            synthetic = SyntheticLoader(cfg, run.train_data.num_classes, dist.rank(), dist.device())
            res, _ = measure(run, synthetic, warmup, cfg.train.steps)
            synth = run.summarise(res)
            out.update(run=run, real=real, synth=synth, gpu=gpu, loader=run.loader.describe())
            del synthetic
        return exits.OK  # leaving the block released the loaders (session.Run.release_loaders) before the barrier
    code = session.guarded("bench.throughput", go)
    if code:
        return code
    run, real, synth, gpu, loader = out["run"], out["real"], out["synth"], out["gpu"], out["loader"]
    ratio = real["steady_images_per_s"] / synth["steady_images_per_s"]
    checks = [S.check(slos["gpu_util_pct"], gpu["util_mean_pct"], gpu.get("why", ""))]
    if dist.is_primary():
        text = table(cfg, run, loader, real, synth, ratio, warmup, checks, slos)
        print(text)
        timeline = gpu.pop("timeline", None)
        result = report.envelope("train", C.to_dict(cfg), None, ranks=dist.size(), real=real, synthetic=synth,
                                 real_over_synthetic=ratio, data=run.data, warmup_steps=warmup, gpu=gpu,
                                 slos=checks, breakdown=real["breakdown"], run_dir=run.dir)

        def chart(plt):
            fig, axes = plt.subplots(1, 2 if timeline else 1, figsize=(9 if timeline else 5, 3), dpi=110,
                                     squeeze=False)
            ax = axes[0][0]
            ax.bar(["real shards", "synthetic"], [real["steady_images_per_s"], synth["steady_images_per_s"]])
            ax.set_ylabel("images/s, all ranks")
            ax.set_title(f"real/synthetic {ratio:.3f}", fontsize=9)
            if timeline:
                R.util_axes(axes[0][1], timeline)
            return fig
        report.publish(run.dir, "train", result, text, chart)
    dist.barrier()
    return exits.OK


if __name__ == "__main__":
    sys.exit(exitmark.mark(main()))
