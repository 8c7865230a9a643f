"""One training run around the step and loop of `hvdtrain.train`: the run folder and its
lock, the provenance banner, resume, the validation schedule and its guard,
checkpoints, and the logs (console, tqdm, metrics.jsonl, TensorBoard, curves.png).

Decisions that only rank 0 can make (the folder, the lock, which checkpoint) are made
there and broadcast, so every rank starts, resumes or refuses together. Exit codes:
0 done; 1 the run failed while training (non-finite loss, val-loss guard, bad sample,
checkpoint write); 2 refused to start (data, classes, lock, resume checks); 3 another
rank stopped or hung (a failed collective, or the watchdog: `hvdtrain.watchdog`).
"""
from __future__ import annotations

import atexit
import dataclasses
import os
import shutil
import sys
import tempfile
import time

import torch

from data import verify
from data.wds import ShardError, ShardSet, open_shards
import kernels
from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import dist, evaluate as E, optim, provenance, report
from hvdtrain import model as M
from hvdtrain import train as T
from hvdtrain.gpumon import GpuMonitor
from hvdtrain.loader import DataError
from hvdtrain.watchdog import EXIT_STALLED, Watchdog


class Refused(RuntimeError):
    """The run must not start; the message says why and what to do."""


def _say(msg: str) -> None:
    if dist.is_primary():
        print(msg, flush=True)


def open_data(cfg: C.Config) -> tuple[ShardSet, ShardSet | None, dict]:
    if not cfg.data.train:
        raise Refused("no training data: pass --data.train=DIR (or a .tar, or a brace pattern)")
    skip = cfg.data.on_error == "skip"
    try:
        train = open_shards(cfg.data.train, check_fit=not skip)
        val = open_shards(cfg.data.val, check_fit=not skip) if cfg.data.val else None
    except ShardError as e:
        raise Refused(f"data error: {e}") from e
    data = {"train": train.describe()}
    if val is not None:
        data["val"] = val.describe()
    if skip:
        train, data["train"]["skipped"] = skip_bad(train, train.num_classes)
        if val is not None:
            val, data["val"]["skipped"] = skip_bad(val, train.num_classes)
    return train, val, data


def skip_bad(shards: ShardSet, num_classes: int | None) -> tuple[ShardSet, list[str]]:
    """--data.on_error=skip: the ranks check the shards between them (shard i on rank
    i % size: every image decoded once), share the indexes of the good samples (one
    allgather), and each writes them into its own temporary folder for DALI."""
    mine = {}
    scratch = tempfile.mkdtemp(prefix=f"hvdtrain-skip-r{dist.rank()}-")
    atexit.register(shutil.rmtree, scratch, True)
    for i, tar in enumerate(shards.paths):
        if i % dist.size() == dist.rank():
            out = os.path.join(scratch, f"{i:06d}.idx")
            _, skipped = verify.skip_index(tar, out, num_classes)
            mine[i] = (open(out).read(), [str(p) for p in skipped])
    merged = {i: v for part in dist.allgather_object(mine, name="skip_index") for i, v in part.items()}
    paths, idx, counts, skipped = [], [], [], []
    for i, tar in enumerate(shards.paths):
        text, bad = merged[i]
        skipped += bad
        n = int(text.split(None, 2)[1])
        if n == 0:
            continue  # nothing left in this shard
        out = os.path.join(scratch, f"{i:06d}.idx")
        with open(out, "w") as f:
            f.write(text)
        paths.append(tar)
        idx.append(out)
        counts.append(n)
    if not paths:
        raise Refused(f"data error: {shards.spec}: every sample is bad ({len(skipped)} skipped): {skipped[:3]}")
    return dataclasses.replace(shards, paths=paths, index_paths=idx, counts=counts), skipped


# ---------------------------------------------------------------- start: folder, lock, resume
def _prepare_primary(cfg: C.Config, current: dict, num_classes: int | None):
    """Rank 0: run folder, lock, and the checkpoint to resume from (checked)."""
    if cfg.run.resume == "auto" and not cfg.run.dir:
        raise Refused("--resume auto needs --run.dir=FOLDER: the run folder to continue")
    run_dir = cfg.run.dir or os.path.join("runs", provenance.run_id(cfg.run.name))
    os.makedirs(run_dir, exist_ok=True)
    lock = ckpt.RunLock(run_dir)
    lock.acquire(log=_say)
    try:
        payload, path, notes = None, None, []
        if cfg.run.resume == "auto":
            found = ckpt.find_resume(run_dir, log=_say)
            if found is None:
                notes.append(f"resume: no checkpoint in {run_dir}: starting from step 0")
            else:
                path, payload = found
        elif cfg.run.resume:
            path, payload = cfg.run.resume, ckpt.load(cfg.run.resume)
        elif ckpt.list_checkpoints(run_dir):
            raise Refused(f"{run_dir} already holds checkpoints ({os.path.basename(ckpt.latest_path(run_dir))}); "
                          f"continue it with --resume auto, or choose another --run.dir")
        if payload is not None:
            diffs = ckpt.check_provenance(payload["provenance"], current, cfg.run.resume_anyway)
            notes += [f"warning: --resume-anyway: {d}" for d in diffs]
            if cfg.train.task == "classify" and payload.get("num_classes") != num_classes:
                raise Refused(f"checkpoint {path} has a {payload.get('num_classes')}-class head but the data has "
                              f"{num_classes} classes")
            notes.append(f"resume: {path} (step {payload['step']}, epoch {payload['epoch']}, "
                         f"saved by {payload['world_size']} rank(s) at {payload['provenance']['git_sha'][:12]})")
    except (ckpt.CheckpointError, ckpt.ResumeRefused, Refused):
        lock.release()
        raise
    return run_dir, lock, payload, path, notes


def prepare(cfg: C.Config, current: dict, num_classes: int | None):
    """Every rank: (run_dir, lock or None, checkpoint payload on rank 0, resume info)."""
    info, lock, payload = {"error": None}, None, None
    if dist.is_primary():
        try:
            run_dir, lock, payload, path, notes = _prepare_primary(cfg, current, num_classes)
            resume = None if payload is None else {k: payload[k] for k in ("step", "epoch", "world_size", "ranks",
                                                                              "best_val_loss")}
            info = {"error": None, "run_dir": run_dir, "resume": resume, "path": path, "notes": notes}
        except (ckpt.CheckpointError, ckpt.ResumeRefused, ckpt.LockError, Refused) as e:
            info = {"error": str(e)}
    info = dist.broadcast_object(info, name="prepare")  # small: per-rank reader states, not weights
    if info["error"]:
        raise Refused(info["error"])
    return info, lock, payload


def restore_rank(info: dict) -> tuple[bytes | None, int, torch.Tensor | None, list[str]]:
    """This rank's DALI reader state, epoch and mixup RNG state from the resume info."""
    r = info["resume"]
    if r is None:
        return None, 0, None, []
    if r["world_size"] != dist.size():
        return None, r["epoch"], None, [f"warning: the checkpoint was saved by {r['world_size']} rank(s), this run has "
                                  f"{dist.size()}: each reader restarts epoch {r['epoch']} from its start (samples "
                                  f"seen earlier in that epoch are seen again)"]
    mine = r["ranks"][dist.rank()]
    torch.set_rng_state(mine["torch_rng"])
    return mine["dali"], mine["epoch"], mine["gen"], []


# ---------------------------------------------------------------- checkpoints
def save_checkpoint(state: T.TrainState, loader, run_dir: str, prov: dict, best_val: float | None,
                    best: bool) -> None:
    """Every rank hands rank 0 its reader and RNG state (one allgather); rank 0 writes;
    the outcome is broadcast so a failed write stops every rank."""
    mine = {"dali": loader.checkpoint(), "gen": state.gen.get_state(), "torch_rng": torch.get_rng_state(),
            "epoch": loader.epoch}
    ranks = dist.allgather_object(mine, name="ckpt_ranks")
    err = None
    if dist.is_primary():
        # the losses are checked only every log_every steps: a diverged model must not be
        # saved in between, or --resume auto (and best.pt) would hand it back
        prev = ckpt.latest_path(run_dir)
        kept = f"the last good one is {prev}" if prev else "none before it"
        why = T.diverged(state, loader, f"checkpoint not saved ({kept})")
        if why:
            err = ("diverged", why)
    if dist.is_primary() and err is None:
        payload = {"format": ckpt.FORMAT, "step": state.step, "epoch": loader.epoch,
                   "model": state.model.state_dict(), "optimizer": state.opt.state_dict(),
                   "scaler": state.scaler.state_dict() if state.scaler is not None else None,
                   "world_size": dist.size(), "ranks": ranks, "num_classes": state.num_classes,
                   "best_val_loss": best_val, "provenance": prov, "config": C.to_dict(state.cfg),
                   "saved_at": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            ckpt.save(run_dir, payload, state.step, state.cfg.train.keep_last, best)
        except ckpt.CheckpointError as e:
            err = ("write", str(e))
    err = dist.broadcast_object(err, name="ckpt_status")
    if err:
        raise (T.TrainingError if err[0] == "diverged" else ckpt.CheckpointError)(err[1])


# ---------------------------------------------------------------- the run
def fit(cfg: C.Config) -> int:
    torch_threads, dali_threads = T.configure_threads(cfg)
    train, val, data = open_data(cfg)
    num_classes = train.num_classes
    try:
        E.check_classes(train, val, cfg.train.task, None)
    except E.DataMismatch as e:
        raise Refused(str(e)) from e
    code, chash = provenance.code_state(), C.config_hash(cfg)
    prov = {**code, "config_hash": chash, "data_fingerprint": {k: d["fingerprint"] for k, d in data.items()}}
    info, lock, payload = prepare(cfg, prov, num_classes)
    try:
        return _run(cfg, train, val, data, info, payload, prov, torch_threads, dali_threads)
    finally:
        if lock is not None:
            lock.release()


def _run(cfg, train, val, data, info, payload, prov, torch_threads, dali_threads) -> int:
    run = Run(cfg, train, val, info, payload, prov, dali_threads)
    if dist.is_primary():
        print(provenance.banner(prov, prov["config_hash"], data, dist.size(), str(dist.device())), flush=True)
        print(f"run     {run.dir}   preset {cfg.preset}, task {cfg.train.task}, model {cfg.model.name}, "
              f"global batch {optim.global_batch(cfg, dist.size())}, peak lr {optim.peak_lr(cfg, dist.size()):.4g}, "
              f"amp {run.state.amp or 'off'}, threads torch {torch_threads} / DALI {dali_threads}"
              f"{', elastic' if cfg.train.elastic else ''}", flush=True)
        a = cfg.aug
        print(f"input   DALI decode {run.loader.spec.decode}, normalize {run.loader.spec.normalize}, mixup {a.mixup}, "
              f"cutmix {a.cutmix}; kernels: {kernels.describe(run.state.device)}", flush=True)
        for n in info["notes"] + run.notes:
            print(n, flush=True)
        report.write_json(os.path.join(run.dir, "config.json"),
                          {"config": C.to_dict(cfg), **prov, "data": data, "resumed_from": info["path"],
                           "start_step": run.state.step, "ranks": dist.size(), "slurm": provenance.slurm_job(),
                           "versions": provenance.versions()})
    res = run.loop()
    run.finish(res)
    return 0


class Run:
    """The state of one run between start and finish: model and optimizer, loaders, logs,
    the watchdog, the best val loss; `on_log` / `on_step` are the loop's hooks."""

    def __init__(self, cfg, train, val, info, payload, prov, dali_threads):
        self.cfg, self.train, self.val, self.prov, self.dali_threads = cfg, train, val, prov, dali_threads
        self.dir = info["run_dir"]
        dali_state, epoch, gen_state, self.notes = restore_rank(info)
        self.state = T.make_state(cfg, train.num_classes, payload)
        E.check_classes(train, val, cfg.train.task, M.head_classes(self.state.model))
        if gen_state is not None:
            self.state.gen.set_state(gen_state)
        self.loader = T.open_loader(cfg, train, dali_threads, checkpoint=dali_state, epoch=epoch)
        self.val_loader = T.open_loader(cfg, val, dali_threads, train=False) if val is not None else None
        self.logs = report.Logs(cfg, self.dir, self.state.step)
        self.bound = E.val_bound(cfg.train.val_loss_bound, cfg.train.task, train.num_classes,
                                 cfg.data.val_batch_size or cfg.train.batch_size)
        self.best_val = info["resume"]["best_val_loss"] if info["resume"] else None
        self.last_val: dict = {}
        self.dog = Watchdog(cfg.run.watchdog_s, dist.rank())
        self.gpu = GpuMonitor(self.state.device)  # sampled from the first log line on: warm-up excluded
        self.gpu_started = False

    def on_log(self, step, values, res, elapsed, out):
        rec = {"step": step, "train_loss": sum(values) / len(values), "lr": out["lr"],
               "throughput_img_s": res.interval_img_s, "elapsed_s": round(elapsed, 3), "epoch": self.loader.epoch,
               "data_wait_share": res.data_wait_s / max(elapsed, 1e-9), "ranks": dist.size(),
               "train_loss_per_step": values}
        if "grad_norm" in out:
            rec["grad_norm"] = float(out["grad_norm"])
        if not self.gpu_started:
            self.gpu.start()
            self.gpu_started = True
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
        if (ck and s % ck == 0) or last or is_best:
            self.dog.beat(f"step {s}, before its checkpoint")
            save_checkpoint(st, self.loader, self.dir, self.prov, self.best_val, is_best)
            self.dog.beat(f"step {s}'s checkpoint")
        self.logs.tick()

    def validate(self, st) -> bool:
        """One val pass; stops the run above the val-loss bound; True for a new best."""
        cfg, s = self.cfg, st.step
        r = E.evaluate(st, self.val_loader, lambda: T.autocast(st), beat=lambda: self.dog.beat(f"a val batch at step {s}"))
        self.last_val.update(r)
        self.logs.record({"step": s, **r}, f"val   {s:6d}  loss {r['val_loss']:.4f}  top-1 {r['val_top1']:.4f}  "
                                           f"top-5 {r['val_top5']:.4f}  ({r['val_samples']} samples)")
        k = self.train.num_classes if cfg.train.task == "classify" else "batch"
        why = E.val_loss_problem(r["val_loss"], self.bound, cfg.train.val_loss_bound, k)
        if why:
            raise T.TrainingError(
                f"validation loss {r['val_loss']:.4g} at step {s} {why} on val data {E.describe_val(self.val)}: the "
                f"model and this data disagree (wrong data or labels, stale code, or a diverged run). Check the "
                f"banner above")
        is_best = self.best_val is None or r["val_loss"] < self.best_val
        self.best_val = r["val_loss"] if is_best else self.best_val
        return is_best

    def loop(self) -> T.LoopResult:
        self.dog.start()
        try:
            if self.cfg.train.elastic:
                return self.elastic_loop()
            return T.run_loop(self.state, self.loader, self.cfg.train.steps - self.state.step,
                              self.on_log, self.on_step)
        finally:
            self.dog.stop()
            self.logs.close()
            self.gpu_summary = self.gpu.stop() if self.gpu_started else {"why": "no log interval ran"}

    def elastic_loop(self) -> T.LoopResult:
        """Horovod elastic: commit every `train.commit_every` steps; when a worker is lost
        (or added) Horovod restores the last commit on the survivors and calls `reset`,
        which rebuilds the DALI pipeline for the new rank and size (its num_shards is fixed
        at build) and rescales the lr to the new global batch."""
        cfg, state = self.cfg, self.state
        est = dist.elastic_state(state.model, state.opt, step=state.step)
        total = T.LoopResult()

        def reset():
            self.loader = T.open_loader(cfg, self.train, self.dali_threads, epoch=self.loader.epoch)
            for g in state.opt.param_groups:
                g["initial_lr"] = optim.peak_lr(cfg, dist.size())
            state.sched = optim.scheduler(cfg, state.opt, est.step)
            self.dog.beat("an elastic reset")
            if dist.is_primary() and not self.logs.on:  # rank 0 was lost: this rank logs from now on
                self.logs = report.Logs(cfg, self.dir, est.step)
            print(f"elastic: rank {dist.rank()} of {dist.size()} now; rebuilt its DALI pipeline (shard {dist.rank()} "
                  f"of {dist.size()}) and resumes from the commit at step {est.step}; peak lr "
                  f"{optim.peak_lr(cfg, dist.size()):.4g}", flush=True)

        est.register_reset_callbacks([reset])

        @dist.elastic_run
        def loop(est):
            state.step = est.step
            while est.step < cfg.train.steps:
                r = T.run_loop(state, self.loader, min(cfg.train.commit_every, cfg.train.steps - est.step),
                               self.on_log, self.on_step)
                for k in ("samples", "steady_samples"):
                    setattr(total, k, getattr(total, k) + getattr(r, k))
                for k in ("wall_s", "steady_s", "data_wait_s"):
                    setattr(total, k, getattr(total, k) + getattr(r, k))
                total.step_losses += r.step_losses
                # a diverged model must not become the state a reset rolls back to; the weights
                # are the same on every rank after the allreduce, so every rank decides alike
                why = T.diverged(state, self.loader, "not committed")
                if why:
                    raise T.TrainingError(why)
                est.step = state.step
                est.commit()

        loop(est)
        return total

    def finish(self, res: T.LoopResult) -> None:
        agg = T.aggregate_throughput(res)
        if not dist.is_primary():
            return
        cfg, prov, lv = self.cfg, self.prov, self.last_val
        report.curves_plot(os.path.join(self.dir, "metrics.jsonl"), os.path.join(self.dir, "curves.png"),
                           f"{cfg.preset} {cfg.train.task} {cfg.model.name}  {prov['git_sha'][:10]}  "
                           f"cfg {prov['config_hash']}")
        summary = {"steps": self.state.step, "images": agg["images"], "images_per_s": agg["images_per_s"],
                   "steady_images_per_s": agg["steady_images_per_s"], "data_wait_share": agg["data_wait_share"],
                   "best_val_loss": self.best_val, **lv, "run_dir": self.dir, "ranks_at_end": dist.size(),
                   "gpu": {k: v for k, v in self.gpu_summary.items() if k != "timeline"}}
        report.write_json(os.path.join(self.dir, "summary.json"), summary)
        val_txt = f", val loss {lv['val_loss']:.4f} top-1 {lv['val_top1']:.4f}" if lv else ""
        g = self.gpu_summary
        if g.get("util_mean_pct") is not None:
            val_txt += f"; GPU util {g['util_mean_pct']:.1f} % mean (rank 0, {g.get('samples')} NVML samples)"
        print(f"done: step {self.state.step}, {agg['images']} images this session, {agg['images_per_s']:.1f} img/s "
              f"(all ranks){val_txt}; run folder {self.dir}", flush=True)


def main(cfg: C.Config) -> int:
    try:
        return fit(cfg)
    except Refused as e:
        if dist.is_primary():  # every rank refuses together; one message is enough
            print(f"hvdtrain.train: {e}", file=sys.stderr, flush=True)
        code = 2
    except (DataError, T.TrainingError, ckpt.CheckpointError) as e:
        print(f"hvdtrain.train: rank {dist.rank()}: {e}", file=sys.stderr, flush=True)
        code = 1
    except RuntimeError as e:
        if not dist.is_collective_failure(e):
            raise
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"hvdtrain.train: rank {dist.rank()}: a collective failed, most likely because another rank "
              f"stopped (the launcher's message names it): {first}", file=sys.stderr, flush=True)
        code = EXIT_STALLED
    return code
