"""Horovod elastic training for a `session.Run` (`--elastic`, Gloo only):

    horovodrun -np 2 --min-np 1 --max-np 2 --host-discovery-script ./hosts.sh \
        python -m hvdtrain.train --elastic ...

The loop commits every `train.commit_every` steps. When a worker is lost (or added)
Horovod restores the last commit on the survivors and calls `reset`, which rebuilds the
train and val loaders for the new rank and size (DALI's num_shards is fixed when a
pipeline is built) and rescales the lr to the new global batch.

A worker that joins a running job (a host that came back) starts from the top of
`hvdtrain.train`, while the workers already there go straight from `reset` to the
elastic state's sync (horovod/common/elastic.py, `run_fn`). Every collective a joiner
would make on its way there (the resume broadcast, the state broadcast, the loaders'
agreement) has no partner, and both sides would wait in different collectives for ever.
So the first collectives of every new world are the same on every worker: `handshake`
(who is new; the running job's run folder, reader epoch and best val loss for a joiner)
and the placement. A joiner then builds its run without collectives and gets the
weights, optimizer state and step from the sync.
"""
from __future__ import annotations

from hvdtrain import dist, logs, optim
from hvdtrain import loader as L
from hvdtrain import step as S
from hvdtrain import timing


def handshake(new: bool, run=None) -> dict | None:
    """Every worker of a new elastic world, first: one allgather of "am I new?". All new:
    the job's start (the usual start-up follows); none new: a shrink. Otherwise the first
    worker that was there broadcasts what a joiner needs of the run, which it returns (to
    every worker; the others ignore it)."""
    flags = dist.allgather_object(bool(new), name="elastic.join")
    if all(flags) or not any(flags):
        return None
    root = flags.index(False)
    give = None
    if dist.rank() == root:
        give = {"info": {**run.info, "resume": None, "path": None, "notes": []}, "epoch": run.loader.epoch,
                "best_val": run.best_val, "scaler": run.state.scaler.state_dict() if run.state.scaler else None}
    return dist.broadcast_object(give, root=root, name="elastic.handover")


def elastic_loop(run) -> S.LoopResult:
    cfg, state = run.cfg, run.state
    est = dist.elastic_state(state.model, state.opt, step=state.step)
    total = S.LoopResult()

    def reset():
        handshake(new=False, run=run)  # the joiner's first collectives are these two (session.Run)
        run.placement = run.dog.placement = dist.placement()
        run.loader = L.from_config(cfg, run.train_data, "train", run.dali_threads, epoch=run.loader.epoch)
        run.val_loader = run._val_loader()  # its shard_id and num_shards changed too
        for g in state.opt.param_groups:
            g["initial_lr"] = optim.peak_lr(cfg, dist.size())
        state.sched = optim.scheduler(cfg, state.opt, est.step)
        run.dog.beat("an elastic reset")
        run.preempt.forget()
        if dist.is_primary() and not run.logs.on:  # rank 0 was lost: this rank logs from now on
            run.logs = logs.Logs(cfg, run.dir, est.step)
        what = "DALI pipeline" if isinstance(run.loader, L.DaliLoader) else "torch loader"
        print(f"elastic: rank {dist.rank()} of {dist.size()} now; rebuilt its {what} (shard {dist.rank()} of "
              f"{dist.size()}){' and its val loader' if run.val_loader else ''} and resumes from the commit at step "
              f"{est.step}; peak lr {optim.peak_lr(cfg, dist.size()):.4g}", flush=True)

    est.register_reset_callbacks([reset])

    @dist.elastic_run
    def loop(est):
        state.step = est.step
        if run.joined:  # after the sync: the job's step, weights and lr; its schedule from there
            state.sched = optim.scheduler(cfg, state.opt, est.step)
            run.joined = None
            run.dog.beat("joining the job")
            what = "DALI pipeline" if isinstance(run.loader, L.DaliLoader) else "torch loader"
            print(f"elastic: rank {dist.rank()} of {dist.size()} joined the job on {dist.node_name()}; built its "
                  f"{what} (shard {dist.rank()} of {dist.size()}) and starts from the commit at step {est.step}; "
                  f"peak lr {optim.peak_lr(cfg, dist.size()):.4g}", flush=True)
        while est.step < cfg.train.steps:
            r = S.run_loop(state, run.loader, min(cfg.train.commit_every, cfg.train.steps - est.step),
                           run.on_log, run.on_step, run.stop_requested)
            for k in ("samples", "steady_samples", "wall_s", "steady_s", "data_wait_s"):
                setattr(total, k, getattr(total, k) + getattr(r, k))
            total.step_losses += r.step_losses
            timing.add(total.phase_s, r.phase_s)
            if r.stopped:  # preempted: the run checkpoints this step and ends PREEMPTED (session.Run.train)
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
