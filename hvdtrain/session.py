"""One run, and its one home: `python -m hvdtrain.train`, `hvdtrain.sanity` and
`bench.throughput` all build a `Run` and drive the step and loop of `hvdtrain.step` with it.

    with Run(cfg) as run:          # data, banner, folder + lock, resume, state, loaders, logs
        result = run.train()       # the loop, validation, checkpoints; summary.json, curves.png

What a run holds: the provenance banner (code SHA, config hash, data fingerprints),
the run folder and its lock, the resume point (`hvdtrain.resume`), model and
optimizer, the train and val loaders (`loader.from_config`), the logs (console, tqdm,
metrics.jsonl, TensorBoard), the watchdog and the GPU monitor, which samples from the
end of the warm-up (the first log interval, or a bench's warm-up steps) to the end.

`guarded` turns what can stop a run into its exit code (`hvdtrain.exits`, the one table)
and one clear message.
"""
from __future__ import annotations

import os
import sys
import time
from dataclasses import dataclass

from hvdtrain.data import dataset
from hvdtrain.data.shards import ShardSet
from hvdtrain.data.tarindex import ShardError
from hvdtrain import kernels
from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import dist, exits, logs, optim, provenance, report
from hvdtrain import valpass as E
from hvdtrain import preempt as P
from hvdtrain import loader as L
from hvdtrain import model as M
from hvdtrain import resume as R
from hvdtrain import step as S
from hvdtrain import synthetic
from hvdtrain import task as TK
from hvdtrain import timing
from hvdtrain.gpumon import GpuMonitor, not_evaluated
from hvdtrain.loader import DataError
from hvdtrain.exits import Refused
from hvdtrain.watchdog import Watchdog


def open_data(cfg: C.Config, alone: bool = False) -> tuple[ShardSet, ShardSet | None, dict]:
    """This rank's data (data.dataset.open_data): refusals become `Refused`. `alone`: an
    elastic joiner, with no peers to share on_error=skip's findings with: it reads the
    records the job's ranks left in the verify cache (a shard with none ends it)."""
    if cfg.data.loader == "synthetic":  # no reader, nothing to open: hvdtrain/synthetic.py
        return synthetic.open_data(cfg, dist.size())
    gather = (lambda obj, name=None: [obj]) if alone else dist.allgather_object
    try:
        return dataset.open_data(cfg, dist.rank(), dist.size(), gather, log=logs.say_here,
                                 needs_classes=TK.get(cfg.train.task).needs_classes)
    except ShardError as e:
        raise Refused(f"data error: {e}") from e


@dataclass
class RunResult:
    loop: S.LoopResult
    throughput: dict        # step.aggregate_throughput: all ranks, one collective
    gpu: dict               # GpuMonitor summary (rank 0's GPU; "not evaluated" with no GPU)
    breakdown: dict         # timing.diagnose over every rank's step time, warm-up excluded


class Run:
    """Everything one run holds between start and finish; `on_log` / `on_step` are the
    loop's hooks. `checkpoints=False` (the sanity, a bench): no resume, no checkpoints."""

    def __init__(self, cfg: C.Config, checkpoints: bool = True):
        self.cfg, self.checkpoints = cfg, checkpoints
        self.lock, self.logs, self.dog = None, None, None
        self.torch_threads, self.dali_threads = S.configure_threads(cfg)
        # elastic: a worker that joins a running job gets the run from the workers there
        # (hvdtrain.elastic.handshake), the first collective of every worker of a new world
        self.joined = None
        if cfg.train.elastic:
            from hvdtrain.elastic import handshake

            self.joined = handshake(new=True)
        self.train_data, self.val_data, self.data = open_data(cfg, alone=bool(self.joined))
        try:
            E.check_classes(self.train_data, self.val_data, cfg.train.task, None)
        except E.DataMismatch as e:
            raise Refused(str(e)) from e
        code = provenance.code_state()
        self.prov = {**code, "config_hash": C.config_hash(cfg),
                     "data_fingerprint": {k: d["fingerprint"] for k, d in self.data.items()},
                     "classes": self.train_data.classes}  # names, where _info.json has them (evaluate checks them)
        if self.joined:  # the run folder, resume point and lock are the running job's
            self.info, payload = self.joined["info"], None
        else:
            self.info, self.lock, payload = R.prepare(cfg, self.prov, self.train_data.num_classes, checkpoints)
        try:
            self._build(payload)
        except BaseException:
            self.close()
            raise

    def _build(self, payload) -> None:
        cfg, info = self.cfg, self.info
        self.dir = info["run_dir"]
        loader_state, epoch, gen_state, notes = R.restore_rank(info)
        joined = self.joined
        if joined:  # the readers' epoch of the job it joins (each reader restarts it on the new sharding)
            epoch = joined["epoch"]
        # a joiner's weights and optimizer state come with the elastic state's sync (hvdtrain.elastic)
        self.state = S.make_state(cfg, self.train_data.num_classes, payload, broadcast=not joined)
        if joined and self.state.scaler is not None and joined["scaler"]:
            self.state.scaler.load_state_dict(joined["scaler"])
        E.check_classes(self.train_data, self.val_data, cfg.train.task, M.head_classes(self.state.model))
        if gen_state is not None:
            self.state.gen.set_state(gen_state)
        self.loader, self.val_loader = self._agreed(lambda: (
            L.from_config(cfg, self.train_data, "train", self.dali_threads, loader_state, epoch), self._val_loader()),
            alone=bool(joined))
        self.logs = logs.Logs(cfg, self.dir, self.state.step)
        self.bound = TK.val_bound(cfg.train.val_loss_bound, self.state.task, self.train_data.num_classes,
                                  cfg.data.val_batch_size or cfg.train.batch_size)
        self.best_val = joined["best_val"] if joined else info["resume"]["best_val_loss"] if info["resume"] else None
        self.last_val: dict = {}
        self.dog = Watchdog(cfg.run.watchdog_s, dist.rank())
        self.preempt, self.saved_step = P.Preempt(self.dir, dist.is_primary()), None
        self.gpu = GpuMonitor(self.state.device)  # started at the end of the warm-up (see the docstring)
        self.gpu_started = False
        self.placement = dist.placement()  # every rank: one allgather
        self.dog.placement = self.placement  # named by the watchdog if a peer goes silent
        if dist.is_primary():
            self._banner(info["notes"] + notes)

    @staticmethod
    def _agreed(make, alone: bool = False):
        """Build the loaders on every rank and agree on the outcome (one allgather): a rank
        that cannot start reading its part of the data (a bad sample where DALI starts, a
        malformed index) stops every rank with its message, instead of leaving the others
        waiting in their first collective. `alone`: an elastic joiner, whose peers are not
        here to agree (a failure ends it, and the job goes on without it)."""
        if alone:
            return make()
        try:
            out, err = make(), None
        except (DataError, ShardError) as e:
            out, err = None, (type(e).__name__, f"rank {dist.rank()}: {e}")
        errs = [x for x in dist.allgather_object(err, name="loaders_ok") if x]
        if errs:
            kind, msg = err or errs[0]
            if kind == "ShardError":
                raise Refused(f"data error: {msg}")
            raise DataError(msg if err is None else msg.split(": ", 1)[1])
        return out

    def _val_loader(self):
        if self.val_data is None:
            return None
        return L.from_config(self.cfg, self.val_data, "val", self.dali_threads)

    def _banner(self, notes: list[str]) -> None:
        cfg, st = self.cfg, self.state
        print(provenance.banner(self.prov, self.prov["config_hash"], self.data, dist.size(), str(dist.device()),
                                self.placement), flush=True)
        print(f"run     {self.dir}   preset {cfg.preset}, task {cfg.train.task}, model {cfg.model.name}, "
              f"global batch {optim.global_batch(cfg, dist.size())}, peak lr {optim.peak_lr(cfg, dist.size()):.4g}, "
              f"amp {st.amp or 'off'}, threads torch {self.torch_threads} / DALI {self.dali_threads}"
              f"{', elastic' if cfg.train.elastic else ''}", flush=True)
        a = cfg.aug
        print(f"input   {self.loader.describe()}, mixup {a.mixup}, cutmix {a.cutmix}; "
              f"kernels: {kernels.describe(st.device)}", flush=True)
        for n in notes:
            print(n, flush=True)
        report.write_json(os.path.join(self.dir, "config.json"),
                          {"config": C.to_dict(cfg), **self.prov, "data": self.data, "resumed_from": self.info["path"],
                           "start_step": st.step, "ranks": dist.size(), "placement": self.placement,
                           "slurm": provenance.slurm_job(),
                           "versions": provenance.versions()})

    def close(self) -> None:
        if self.dog is not None:
            self.dog.stop()
        if getattr(self, "gpu_started", False):
            self.stop_gpu()
        self.release_loaders()
        if self.logs is not None:
            self.logs.close()
            self.logs = None
        if self.lock is not None:
            self.lock.release()
            self.lock = None
        from hvdtrain.data import nodecache

        nodecache.close_all()  # bucket data: this process's wants withdrawn, a fetcher here stopped

    def release_loaders(self) -> None:
        """Drop the loaders (val, then train) and their DALI pipelines now, then wait for the
        device: their threads and CUDA buffers go while CUDA is whole, before the entry
        point's final barrier, not at interpreter shutdown, where DALI can abort
        (`cudaErrorDeviceUninitialized`, NVIDIA/DALI#6166). After it `loader` is None."""
        import gc

        import torch

        for name in ("val_loader", "loader"):
            loader = getattr(self, name, None)
            if loader is None:
                continue
            close = getattr(loader, "close", None)
            if close is not None:  # DaliLoader (its pipelines), TorchLoader; a SyntheticLoader holds none
                close()
            setattr(self, name, None)
        gc.collect()  # a DALI pipeline can sit in a reference cycle (its iterator, a generator)
        if torch.cuda.is_available():
            torch.cuda.synchronize()

    def __enter__(self) -> "Run":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- the loop's hooks
    def start_gpu(self, fresh: bool = False) -> None:
        """The one rule for GPU sampling: from the end of the warm-up on. `fresh`: a new
        window with a monitor of its own (a bench measures more than one)."""
        if fresh:
            self.gpu, self.gpu_started = GpuMonitor(self.state.device), False
        if not self.gpu_started:
            self.gpu.start()
            self.gpu_started = True

    def stop_gpu(self) -> dict:
        started, self.gpu_started = self.gpu_started, False
        if started:
            self._gpu_summary = self.gpu.stop()
            return self._gpu_summary
        if getattr(self, "_gpu_summary", None) is not None:  # stopped already (train, then close)
            return self._gpu_summary
        return self.gpu.stop() if self.gpu.why_not else not_evaluated("no step after the warm-up")

    def on_log(self, step, values, res, elapsed, out):
        rec = {"step": step, "train_loss": sum(values) / len(values), "lr": out["lr"],
               "throughput_img_s": res.interval_img_s, "elapsed_s": round(elapsed, 3), "epoch": self.loader.epoch,
               "data_wait_share": res.data_wait_s / max(elapsed, 1e-9), "ranks": dist.size(),
               "train_loss_per_step": values, "phase_share": timing.shares(res.interval_phase_s)}
        if "grad_norm" in out:
            rec["grad_norm"] = float(out["grad_norm"])
        self.start_gpu()  # the first log line ends the warm-up
        self.logs.record(rec, f"step {step:6d}  loss {rec['train_loss']:.4f}  lr {rec['lr']:.3g}  "
                              f"{res.interval_img_s:.0f} img/s (all ranks)  epoch {self.loader.epoch}")

    def on_step(self, st) -> None:
        cfg, s = self.cfg, st.step
        last = s == cfg.train.steps
        ev, ck = cfg.train.eval_every, cfg.train.ckpt_every
        self.dog.beat(f"step {s}")
        is_best = False
        if self.val_loader is not None and ((ev and s % ev == 0) or last):
            is_best = self.validate(st)
        if self.checkpoints and ((ck and s % ck == 0) or last or is_best):
            self.dog.beat(f"step {s}, before its checkpoint")
            R.save_checkpoint(st, self.loader, self.dir, self.prov, self.best_val, is_best)
            self.saved_step = s
            self.dog.beat(f"step {s}'s checkpoint")
        self.logs.tick()

    def validate(self, st) -> bool:
        """One val pass; stops the run above the val-loss bound; True for a new best."""
        cfg, s = self.cfg, st.step
        r = E.evaluate(st, self.val_loader, lambda: S.autocast(st), beat=lambda: self.dog.beat(f"a val batch at step {s}"))
        self.last_val.update(r)
        self.logs.record({"step": s, **r}, f"val   {s:6d}  loss {r['val_loss']:.4f}  top-1 {r['val_top1']:.4f}  "
                                           f"top-5 {r['val_top5']:.4f}  ({r['val_samples']} samples)")
        k = st.task.bound_k(self.train_data.num_classes, cfg.data.val_batch_size or cfg.train.batch_size)
        why = E.val_loss_problem(r["val_loss"], self.bound, cfg.train.val_loss_bound, k)
        if why:
            raise S.TrainingError(
                f"validation loss {r['val_loss']:.4g} at step {s} {why} on val data {E.describe_val(self.val_data)}: "
                f"the model and this data disagree (wrong data or labels, stale code, or a diverged run). Check "
                f"the banner above")
        is_best = self.best_val is None or r["val_loss"] < self.best_val
        self.best_val = r["val_loss"] if is_best else self.best_val
        return is_best

    # ---------------------------------------------------------------- driving the loop
    def train(self) -> RunResult:
        """The run's remaining steps with validation and checkpoints; summary.json."""
        self.dog.start()
        try:
            if self.cfg.train.elastic:
                from hvdtrain.elastic import elastic_loop

                res = elastic_loop(self)
            else:
                res = S.run_loop(self.state, self.loader, self.cfg.train.steps - self.state.step,
                                 self.on_log, self.on_step, self.stop_requested)
            self.preempt.drain()
            if res.stopped:
                self.stop_preempted()  # raises P.Preempted: exits.PREEMPTED
        finally:
            self.dog.stop()
            gpu = self.stop_gpu()
        return self.finish(res, gpu)

    def stop_requested(self, st) -> bool:
        """The loop's `stop` hook: one allreduce per step (`hvdtrain.preempt`)."""
        return self.preempt.requested()

    def stop_preempted(self) -> None:
        """The loop stopped for a preemption: rank 0 checkpoints at this step (unless
        on_step just did; every rank takes part in the save) and writes preempted.json.
        Raises P.Preempted. Signals that come meanwhile are only recorded (`hvdtrain.preempt`)."""
        st, t0, n = self.state, time.perf_counter(), len(P.received())
        path = None
        if self.checkpoints:
            if self.saved_step != st.step:
                self.dog.beat(f"step {st.step}, before its preemption checkpoint")
                R.save_checkpoint(st, self.loader, self.dir, self.prov, self.best_val, False)
            path = os.path.join(self.dir, f"ckpt-{st.step:08d}.pt")
        raise P.stopped(self.preempt, self.dir, st.step, self.cfg.train.steps, path, time.perf_counter() - t0,
                        len(P.received()) - n)

    def fetch_stats(self) -> dict | None:
        """The node's fetcher counters (bucket data read through the cache), or None."""
        d = self.train_data
        if not d.is_remote or getattr(d.remote, "mode", "") != "cache":
            return None
        from hvdtrain.data import nodecache

        s = nodecache.get(d.remote).stats()
        return {k: s.get(k, 0) for k in ("shards", "bytes", "gets", "retries", "evicted", "evicted_bytes", "failed",
                                         "bound_bytes")} if s else None

    def diagnosis(self, phase_s: dict) -> dict:
        spec = getattr(self.loader, "spec", None)
        return timing.diagnose(phase_s, {"gpu": self.state.device.type == "cuda", "dali_threads": self.dali_threads,
                                         "cores_per_rank": dist.cores_per_rank(),
                                         "decode": getattr(spec, "decode", None)})

    def summarise(self, res: S.LoopResult) -> dict:
        """Images/s over all ranks (one collective) and the step-time breakdown's verdict."""
        agg = S.aggregate_throughput(res)
        breakdown = {**self.diagnosis(agg["phase_s"]),
                     "straggler": timing.straggler(res.rank_busy_s, res.rank_wait_s, self.placement)}
        return {**agg, "breakdown": breakdown}

    def finish(self, res: S.LoopResult, gpu: dict) -> RunResult:
        agg = self.summarise(res)
        out = RunResult(res, agg, gpu, agg["breakdown"])
        if not dist.is_primary():
            return out
        cfg, prov, lv = self.cfg, self.prov, self.last_val
        report.curves_plot(os.path.join(self.dir, "metrics.jsonl"), os.path.join(self.dir, "curves.png"),
                           f"{cfg.preset} {cfg.train.task} {cfg.model.name}  {prov['git_sha'][:10]}  "
                           f"cfg {prov['config_hash']}")
        summary = {"steps": self.state.step, "images": agg["images"], "images_per_s": agg["images_per_s"],
                   "steady_images_per_s": agg["steady_images_per_s"], "data_wait_share": agg["data_wait_share"],
                   "best_val_loss": self.best_val, **lv, "run_dir": self.dir, "ranks_at_end": dist.size(),
                   "data_fingerprint": prov["data_fingerprint"],
                   "gpu": {k: v for k, v in gpu.items() if k != "timeline"}, "breakdown": out.breakdown}
        fetched = self.fetch_stats()
        if fetched:
            summary["bucket_fetch"] = fetched
            print(f"data    fetched from the bucket on this node: {fetched['shards']} shard(s), "
                  f"{fetched['bytes'] / 1e6:.1f} MB, {fetched['gets']} GET(s), {fetched['retries']} retried, "
                  f"{fetched['evicted']} evicted (cache bound {fetched['bound_bytes'] / 1e9:.2f} GB)", flush=True)
        report.write_json(os.path.join(self.dir, "summary.json"), summary)
        val_txt = f", val loss {lv['val_loss']:.4f} top-1 {lv['val_top1']:.4f}" if lv else ""
        if gpu.get("util_mean_pct") is not None:
            val_txt += f"; GPU util {gpu['util_mean_pct']:.1f} % mean (rank 0, {gpu.get('samples')} NVML samples)"
        print(f"time    {timing.describe(out.breakdown)}", flush=True)
        syn = " on SYNTHETIC data" if cfg.data.loader == "synthetic" else ""
        print(f"done: step {self.state.step}{syn}, {agg['images']} images this session, {agg['images_per_s']:.1f} "
              f"img/s (all ranks){val_txt}; run folder {self.dir}", flush=True)
        return out


def fit(cfg: C.Config) -> int:
    with Run(cfg) as run:
        run.train()
    return exits.OK


def guarded(prog: str, fn, codes: dict | None = None) -> int:
    """Run `fn()` and map what can stop a run to its exit code (`hvdtrain.exits`) with one
    clear message: Refused -> REFUSED, a data/training/checkpoint error -> FAILED, a failed
    collective -> STALLED, a preemption -> PREEMPTED. `codes` overrides the code per
    exception class (the sanity refuses on a bad sample: DataError -> REFUSED)."""
    codes = codes or {}
    try:
        return fn()
    except P.Preempted as e:
        logs.say(f"{prog}: {e}", file=sys.stderr)
        return exits.PREEMPTED
    except Refused as e:
        if dist.is_primary():  # every rank refuses together; one message is enough
            print(f"{prog}: {e}", file=sys.stderr, flush=True)
        else:
            print(f"{prog}: rank {dist.rank()}: refused to start, as rank 0 says", file=sys.stderr, flush=True)
        return codes.get(Refused, exits.REFUSED)
    except (DataError, S.TrainingError, ckpt.CheckpointError) as e:
        print(f"{prog}: rank {dist.rank()}: {e}", file=sys.stderr, flush=True)
        return codes.get(type(e), exits.FAILED)
    except RuntimeError as e:
        if not dist.is_collective_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        where = (f"; the ranks ran on {provenance.describe_placement(dist.last_placement)}"
                 if dist.last_placement else "")
        print(f"{prog}: rank {dist.rank()}: a collective failed, most likely because another rank "
              f"stopped (the launcher's message names it): {first}{where}", file=sys.stderr, flush=True)
        return exits.STALLED


def main(cfg: C.Config) -> int:
    return guarded("hvdtrain.train", lambda: fit(cfg))
