"""Horovod elastic training for a `session.Run` (`--elastic`, Gloo only):

    horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script ./hosts.sh \
        python -m hvdtrain.train --elastic ...

The loop commits every `train.commit_every` steps. When a worker is lost (or added)
Horovod restores the last commit on the survivors and calls `reset`, which rebuilds the
train and val loaders for the new rank and size (DALI's num_shards is fixed when a
pipeline is built) and rescales the lr to the new global batch.
"""
from __future__ import annotations

from hvdtrain import dist, optim, report
from hvdtrain import loader as L
from hvdtrain import step as S
from hvdtrain import timing


def elastic_loop(run) -> S.LoopResult:
    cfg, state = run.cfg, run.state
    est = dist.elastic_state(state.model, state.opt, step=state.step)
    total = S.LoopResult()

    def reset():
        run.loader = L.from_config(cfg, run.train_data, "train", run.dali_threads, epoch=run.loader.epoch)
        run.val_loader = run._val_loader()  # its shard_id and num_shards changed too
        for g in state.opt.param_groups:
            g["initial_lr"] = optim.peak_lr(cfg, dist.size())
        state.sched = optim.scheduler(cfg, state.opt, est.step)
        run.dog.beat("an elastic reset")
        run.preempt.forget()
        if dist.is_primary() and not run.logs.on:  # rank 0 was lost: this rank logs from now on
            run.logs = report.Logs(cfg, run.dir, est.step)
        what = "DALI pipeline" if isinstance(run.loader, L.DaliLoader) else "torch loader"
        print(f"elastic: rank {dist.rank()} of {dist.size()} now; rebuilt its {what} (shard {dist.rank()} of "
              f"{dist.size()}){' and its val loader' if run.val_loader else ''} and resumes from the commit at step "
              f"{est.step}; peak lr {optim.peak_lr(cfg, dist.size()):.4g}", flush=True)

    est.register_reset_callbacks([reset])

    @dist.elastic_run
    def loop(est):
        state.step = est.step
        while est.step < cfg.train.steps:
            r = S.run_loop(state, run.loader, min(cfg.train.commit_every, cfg.train.steps - est.step),
                           run.on_log, run.on_step, run.stop_requested)
            for k in ("samples", "steady_samples", "wall_s", "steady_s", "data_wait_s"):
                setattr(total, k, getattr(total, k) + getattr(r, k))
            total.step_losses += r.step_losses
            timing.add(total.phase_s, r.phase_s)
            if r.stopped:  # preempted: the run checkpoints this step and exits 4 (session.Run.train)
                total.stopped = True
                return
            # a diverged model must not become the state a reset rolls back to; the weights
            # are the same on every rank after the allreduce, so every rank decides alike
            why = S.diverged(state, run.loader, "not committed")
            if why:
                raise S.TrainingError(why)
            est.step = state.step
            est.commit()

    loop(est)
    return total
