"""Nodes that vanish, stall or come back, on Slurm nodes that are hosts with their own
network (h1..h3: one network namespace each, joined by a bridge; launch/testhosts.py).
A node cut off here sends no reset: to its peers it is a rank that hangs.

- power loss under srun and under horovodrun: node h2's link goes down and everything on
  it is SIGKILLed; the job ends within the watchdog's timeout plus a bound, the output
  names the rank and node that went silent, and --resume auto on h1+h3 continues;
- NODE_FAIL: the same loss with the watchdog out of the way; Slurm marks h2 DOWN after
  SlurmdTimeout, requeues the --requeue job, which resumes on h1+h3 with the losses of an
  uninterrupted run;
- Slurm's own timer: --time=1 --signal=B:USR1@10 warns the batch shell; the job
  checkpoints, requeues itself, and ends with the losses of an uninterrupted run;
- a straggler: rank 1's CPU on h2 is throttled; the breakdown names rank 1 on h2.
Times go to stdout as HOSTS_TIMES lines (docs/reliability.md quotes them)."""
import json
import os
import signal
import threading
import time

import pytest

from hvdtrain import checkpoint as ckpt
from launch import testhosts
from tests.conftest import ROOT
from tests.e2e.harness import HOROVODRUN, TRAIN, losses, run
from tests.slurm.jobs import job_field, output, sbatch, wait_job, wait_until

STEPS = 60
WATCHDOG_S = 8
# one torch thread per rank everywhere (the reference too): the same sums, the same losses
ARGS = ["--preset", "ci", "--task", "classify", "--run.progress=False", "--run.tensorboard=False",
        "--train.log_every=1", "--train.ckpt_every=4", f"--train.steps={STEPS}", "--train.torch_threads=1"]
PAIR = ("--nodes=2", "--ntasks-per-node=1")


def launcher_env(hosts, launcher):
    if launcher == "srun":
        return {"LAUNCHER": "srun"}
    return {"LAUNCHER": "horovodrun", "HOROVODRUN_ARGS": f"--ssh-port {hosts['ssh']['port']} "
                                                         f"--ssh-identity-file {hosts['ssh']['identity']}"}


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    """Per-step losses of an uninterrupted 2-rank run of ARGS (horovodrun on this host)."""
    d = tmp_path_factory.mktemp("ref")
    r = run(HOROVODRUN + TRAIN + ARGS + [f"--data.train={synth_data}/train", f"--run.dir={d}/ref"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return losses(d / "ref")


def submit(hosts, data, run_dir, launcher="srun", opts=PAIR, more=()):
    return sbatch(hosts["env"], "train.sbatch", *ARGS, f"--data.train={data}/train", f"--run.dir={run_dir}", *more,
                  extra_env=launcher_env(hosts, launcher), opts=opts)


def placement(run_dir):
    return json.load(open(os.path.join(run_dir, "config.json")))["placement"]


def steps_logged(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(x)["step"] for x in open(path).read().splitlines() if '"train_loss"' in x] \
        if os.path.exists(path) else []


def wait_checkpoint(env, job, run_dir, step):
    wait_until(env, job, f"checkpoint of step {step}",
               lambda: any(ckpt.load(p)["step"] >= step for p in ckpt.list_checkpoints(run_dir)[-1:]), 240, 0.2)


@pytest.mark.parametrize("launcher", ["srun", "horovodrun"])
def test_power_loss_of_a_node_ends_the_job_naming_it_and_resume_continues(hosts, synth_data, tmp_path, launcher):
    env, run_dir = hosts["env"], str(tmp_path / f"power-{launcher}")
    job = submit(hosts, synth_data, run_dir, launcher, opts=(*PAIR, "--nodelist=h1,h2", "--no-requeue"),
                 more=(f"--run.watchdog_s={WATCHDOG_S}",))
    wait_checkpoint(env, job, run_dir, 8)
    assert [p["node"] for p in placement(run_dir)] == ["h1", "h2"]
    t_cut = time.monotonic()
    testhosts.cut(hosts["dir"], "h2")
    try:
        state, out = wait_job(env, job, timeout_s=120)
        ended_s = time.monotonic() - t_cut
        assert state in ("FAILED", "NODE_FAIL"), out[-3000:]
        assert (f"rank 0: no progress for" in out and "Waiting on: rank 1 on h2 (another node: silent" in out), \
            out[-3000:]
        # the watchdog's timeout, at most a quarter of it more (its poll), then the launcher's teardown
        bound_s = WATCHDOG_S * 1.25 + 20
        print(f"\nHOSTS_TIMES power loss ({launcher}): cut -> job {state} {ended_s:.1f} s "
              f"(watchdog_s={WATCHDOG_S}, bound {bound_s:.0f} s)")
        assert ended_s < bound_s, f"the job took {ended_s:.1f} s to end after h2 was cut\n{out[-3000:]}"
        newest = ckpt.list_checkpoints(run_dir)[-1]
        step = ckpt.load(newest)["step"]
        assert step >= 8
        # the same layout on the nodes left: the same config, so no --resume-anyway
        again = submit(hosts, synth_data, run_dir, launcher, opts=(*PAIR, "--nodelist=h1,h3"), more=("--resume", "auto"))
        state, out = wait_job(env, again)
        assert state == "COMPLETED", out[-3000:]
        assert f"resume: {newest} (step {step}" in out, out[-3000:]
        assert [p["node"] for p in placement(run_dir)] == ["h1", "h3"]
        assert max(losses(run_dir)) == STEPS
    finally:
        testhosts.revive(hosts["dir"], "h2", env)
