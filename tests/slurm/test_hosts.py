"""Nodes that vanish, stall or come back, on Slurm nodes that are hosts with their own
network (h1..h3: one network namespace each, joined by a bridge; tests/clusters/testhosts.py).
A node cut off here sends no reset: to its peers it is a rank that hangs.

- power loss under srun and under horovodrun: node h2's link goes down and everything on
  it is SIGKILLed; the job ends within the watchdog's timeout plus a bound, the output
  names the rank and node that went silent, and --resume auto on h1+h3 continues;
- NODE_FAIL: the same loss with the watchdog out of the way; Slurm marks h2 DOWN after
  SlurmdTimeout, requeues the --requeue job, which resumes on h1+h3 with the losses of an
  uninterrupted run;
- Slurm's own timer: --time=1 --signal=B:USR1@10 warns the batch shell; the job
  checkpoints, requeues itself, and ends with the losses of an uninterrupted run;
- a straggler: rank 1's CPU on h2 is throttled; the breakdown names rank 1 on h2;
- elastic across nodes: refused without ssh keepalives; with them, h2 cut shrinks the job
  to h1 from the last commit, and h2 back (before Slurm marks it DOWN) grows it again.
Times go to stdout as HOSTS_TIMES lines (docs/reliability.md quotes them)."""
import json
import math
import os
import signal
import subprocess
import threading
import time

import pytest

from hvdtrain import checkpoint as ckpt
from launch.slurm import expand_nodelist
from tests import procs
from tests.clusters import testhosts
from tests.conftest import ROOT
from tests.e2e.harness import HOROVODRUN, TRAIN, losses, run
from tests.slurm.jobs import job_field, output, sbatch, wait_job, wait_until

STEPS = 60
WATCHDOG_S = 8
# one torch thread per rank everywhere (the reference too): the same sums, the same losses
ARGS = ["--preset", "ci", "--task", "classify", "--run.progress=False", "--run.tensorboard=False",
        "--train.log_every=1", "--train.ckpt_every=4", f"--train.steps={STEPS}", "--train.torch_threads=1"]
PAIR = ("--nodes=2", "--ntasks-per-node=1")
# the requeue tests compare every step's loss with an uninterrupted run: long enough that
# Slurm's timer (its first periodic check, up to 30 s after the start) finds it training
LONG_STEPS = 480
LONG = [a for a in ARGS if not a.startswith(("--train.steps=", "--train.ckpt_every="))] + [
    f"--train.steps={LONG_STEPS}", "--train.ckpt_every=20"]
# Slurm's own timer warns at its first check after start + limit - warning - 30 s, so at
# 0 to 30 s into a --time=1 --signal=B:USR1@45 job: the job must still train past 30 s.
# 480 steps (15-20 s of training here) lost that race; 1000 train for about 35-40 s.
TIMER_STEPS = 1000
TIMER = [a for a in LONG if not a.startswith("--train.steps=")] + [f"--train.steps={TIMER_STEPS}"]


def launcher_env(hosts, launcher):
    if launcher == "srun":
        return {"LAUNCHER": "srun"}
    return {"LAUNCHER": "horovodrun", "HOROVODRUN_ARGS": f"--ssh-port {hosts['ssh']['port']} "
                                                         f"--ssh-identity-file {hosts['ssh']['identity']}"}


@pytest.fixture(scope="module")
def reference(synth_data, tmp_path_factory):
    """Per-step losses of an uninterrupted 2-rank run of LONG (horovodrun on this host)."""
    d = tmp_path_factory.mktemp("ref")
    r = run(HOROVODRUN + TRAIN + LONG + [f"--data.train={synth_data}/train", f"--run.dir={d}/ref"], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return losses(d / "ref")


def submit(hosts, data, run_dir, launcher="srun", opts=PAIR, more=(), args=ARGS):
    return sbatch(hosts["env"], "train.sbatch", *args, f"--data.train={data}/train", f"--run.dir={run_dir}", *more,
                  extra_env=launcher_env(hosts, launcher), opts=opts)


def placement(run_dir):
    return json.load(open(os.path.join(run_dir, "config.json")))["placement"]


def metrics(run_dir):
    path = os.path.join(run_dir, "metrics.jsonl")
    return [json.loads(x) for x in open(path).read().splitlines() if '"train_loss"' in x] if os.path.exists(path) else []


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


def assert_same_losses(run_dir, reference, steps=LONG_STEPS):
    """Every step 1..steps logged once; those the reference has (its LONG_STEPS) equal it.
    A longer run's first LONG_STEPS steps are the reference's: the ci preset's lr is constant."""
    got = losses(run_dir)
    assert sorted(got) == list(range(1, steps + 1))
    bad = [s for s in got if s in reference and got[s] != reference[s]]
    assert not bad, f"{len(bad)} step(s) differ from the uninterrupted run, first {bad[0]}: {got[bad[0]]} != " \
                    f"{reference[bad[0]]}"


def test_node_failure_requeues_the_job_and_it_resumes_on_the_nodes_left(hosts, synth_data, tmp_path, reference):
    """h2 dies with its network while the watchdog waits (60 s): Slurm marks it DOWN after
    SlurmdTimeout, ends the job NODE_FAIL and requeues it (--requeue, train.sbatch's
    default); it runs again on h1+h3 with --resume auto, and every step's loss equals the
    uninterrupted run's."""
    env, run_dir = hosts["env"], str(tmp_path / "nodefail")
    job = submit(hosts, synth_data, run_dir, args=LONG, more=("--run.watchdog_s=60",))
    wait_checkpoint(env, job, run_dir, 20)
    assert [p["node"] for p in placement(run_dir)] == ["h1", "h2"]
    t_cut = time.monotonic()
    testhosts.cut(hosts["dir"], "h2")
    try:
        wait_until(env, job, "h2 DOWN in sinfo", lambda: "down" in testhosts.node_state(env, "h2"), 90, 0.5)
        t_down = time.monotonic()
        wait_until(env, job, "restart 1", lambda: job_field(env, job, "Restarts") == "1", 90, 0.5)
        wait_until(env, job, "training again after the requeue",
                   lambda: "restart 1 of job" in output(job) and "h3" in open(os.path.join(run_dir, "config.json")).read()
                   and len(steps_logged(run_dir)) > len(set(steps_logged(run_dir))), 180, 0.3)
        t_again = time.monotonic()
        state, out = wait_job(env, job)
        assert state == "COMPLETED", out[-3000:]
        assert [p["node"] for p in placement(run_dir)] == ["h1", "h3"]
        assert f"restart 1 of job {job}: continuing with --resume auto" in out
        assert "resume: " in out.split(f"restart 1 of job {job}")[1]
        assert_same_losses(run_dir, reference)
        print(f"\nHOSTS_TIMES node failure: cut -> h2 DOWN {t_down - t_cut:.1f} s (SlurmdTimeout="
              f"{testhosts.SLURMD_TIMEOUT_S}); -> training again on h1+h3 {t_again - t_cut:.1f} s")
    finally:
        testhosts.revive(hosts["dir"], "h2", env)


def test_slurms_own_timer_checkpoints_requeues_and_the_losses_equal(hosts, synth_data, tmp_path, reference):
    """--time=1 --signal=B:USR1@45: Slurm itself warns the batch shell (its timer checks
    every 30 s, so the warning comes 0 to 30 s into the job: before the launcher starts, at
    worst, which slurm_run.sh handles). The requeued job would get the same warning again;
    the test raises its limit once it requeues, as an admin would for a job that needs more
    time than it asked for."""
    env, run_dir = hosts["env"], str(tmp_path / "timer")
    t0 = time.monotonic()
    job = submit(hosts, synth_data, run_dir, args=TIMER, opts=(*PAIR, "--time=1", "--signal=B:USR1@45"))
    wait_until(env, job, "Slurm's warning", lambda: "got SIGUSR1" in output(job), 90, 0.3)
    t_sig = time.monotonic()
    wait_until(env, job, "the requeue", lambda: "requeueing job" in output(job), 60, 0.2)
    subprocess.run(["scontrol", "update", f"JobId={job}", "TimeLimit=10"], env=env, check=True, timeout=30)
    rec = json.load(open(os.path.join(run_dir, "preempted.json")))
    assert rec["reason"] == "preempt.request from the batch shell" and rec["request"].startswith("SIGUSR1"), rec
    state, out = wait_job(env, job)
    t_end = time.monotonic()
    assert state == "COMPLETED", out[-3000:]
    assert job_field(env, job, "Restarts") == "1"
    assert f"resume: {run_dir}/ckpt-{rec['step']:08d}.pt (step {rec['step']}" in out, out[-3000:]
    assert_same_losses(run_dir, reference, TIMER_STEPS)
    print(f"\nHOSTS_TIMES Slurm timer: submit -> USR1 {t_sig - t0:.1f} s; stop after step {rec['step']} "
          f"(checkpoint {rec['checkpoint_s']} s); USR1 -> COMPLETED {t_end - t_sig:.1f} s")


def throttle(pid: int, stop: threading.Event, on_s=0.03, off_s=0.07) -> None:
    """Give process `pid` 30 % of its CPU time: SIGSTOP / SIGCONT, as cpulimit does."""
    while not stop.is_set():
        try:
            os.kill(pid, signal.SIGSTOP)
            time.sleep(off_s)
            os.kill(pid, signal.SIGCONT)
            time.sleep(on_s)
        except ProcessLookupError:
            return
    try:
        os.kill(pid, signal.SIGCONT)
    except ProcessLookupError:
        pass


def rank_on(hosts, node, module):
    """The pid of `python -m MODULE` on `node` (in its namespace), or None."""
    ns = testhosts._state(hosts["dir"])["ns"][node]
    found = procs.pids(args=(module,), without=("launch.slurm",), among=testhosts.ns_pids(ns))
    return found[0] if found else None


def test_a_throttled_node_is_named_the_straggler(hosts, synth_data):
    """Rank 1's CPU on h2 gets 30 % of the time; the job keeps going, and the sanity's
    step-time breakdown (console and sanity.json) names rank 1 on h2 from the per-rank
    busy times gathered with the log lines' allreduce."""
    env = hosts["env"]
    job = sbatch(env, "sanity.sbatch", "--preset", "ci", f"--data.train={synth_data}/train", "--train.steps=80",
                 "--train.torch_threads=1", extra_env={"LAUNCHER": "srun"}, opts=(*PAIR, "--nodelist=h1,h2"))
    pid = []
    wait_until(env, job, "rank 1 running on h2", lambda: pid.append(rank_on(hosts, "h2", "hvdtrain.sanity")) or pid[-1],
               120, 0.2)
    stop = threading.Event()
    t = threading.Thread(target=throttle, args=(pid[-1], stop), daemon=True)
    t.start()
    try:
        state, out = wait_job(env, job, timeout_s=300)
    finally:
        stop.set()
        t.join()
    rep = json.load(open(os.path.join(ROOT, "runs", f"slurm-{job}", "sanity.json")))
    s = rep["breakdown"]["straggler"]
    assert s and (s["rank"], s["node"]) == (1, "h2"), (rep["breakdown"], out[-3000:])
    assert "waiting on a peer: rank 1 on h2 is the straggler" in out, out[-3000:]
    print(f"\nHOSTS_TIMES straggler: rank 1 on h2 busy {s['busy_s']:.2f} s, {s['ratio']:.1f}x the others; "
          f"verdict {rep['breakdown']['bound']}")


# elastic across nodes: Gloo's timeout bounds both how long the ranks left wait for a silent
# peer and how long they wait at a new world's rendezvous for a worker that joins (its ssh,
# Python and imports); Horovod's cooldown keeps a failed node out for 4 to 6 s here
GLOO_TIMEOUT_S = 8
ELASTIC_ARGS = [a for a in ARGS if not a.startswith(("--train.steps=", "--train.ckpt_every="))] + [
    "--elastic", "--train.commit_every=5", "--train.steps=100000", "--train.ckpt_every=100000"]


def ssh_with_keepalives(hosts, folder):
    """The test cluster's ssh with the keepalives a cluster's ~/.ssh/config would set
    (the PATH folder to put first)."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "ssh"), "w") as f:
        f.write(f"#!/bin/sh\nexec {hosts['ssh']['path']}/ssh -o ServerAliveInterval=1 -o ServerAliveCountMax=3 "
                f"-o ConnectTimeout=3 \"$@\"\n")
    os.chmod(os.path.join(folder, "ssh"), 0o755)
    return folder


def elastic_env(hosts, keepalive_dir=None):
    path = hosts["env"]["PATH"] if keepalive_dir is None else f"{keepalive_dir}:{hosts['env']['PATH']}"
    return {**launcher_env(hosts, "horovodrun"), "PATH": path, "ELASTIC_MIN_NP": "1", "ELASTIC_COOLDOWN": "2 10",
            "HOROVOD_GLOO_TIMEOUT_SECONDS": str(GLOO_TIMEOUT_S)}


def test_elastic_across_nodes_shrinks_on_a_power_loss_and_grows_when_the_node_is_back(hosts, synth_data, tmp_path):
    """`--elastic` under train.sbatch (--no-kill: Slurm keeps the job when h2 goes down):
    horovodrun's elastic driver with `launch.slurm discover` (the job's nodes that answer
    on the ssh port). Without ssh keepalives the launcher refuses (a cut node's ssh would
    never exit: docs/reliability.md). With them: h2 is cut at step 20; the rank on h1 goes
    on alone from the last commit; h2 is revived before Slurm marks it DOWN, and after
    Horovod's cooldown a rank joins there and training goes on with 2 ranks."""
    env, run_dir = hosts["env"], str(tmp_path / "elastic")
    opts = (*PAIR, "--nodelist=h1,h2", "--no-kill", "--no-requeue")
    job = sbatch(env, "train.sbatch", *ELASTIC_ARGS, f"--data.train={synth_data}/train", f"--run.dir={run_dir}",
                 extra_env=elastic_env(hosts), opts=opts)
    state, out = wait_job(env, job, timeout_s=60)
    assert state == "FAILED" and "--elastic across nodes needs ssh keepalives, and `ssh -G h2` says " \
                                 "serveraliveinterval 0" in out, out[-3000:]
    t0 = time.monotonic()
    job = sbatch(env, "train.sbatch", *ELASTIC_ARGS, f"--data.train={synth_data}/train", f"--run.dir={run_dir}",
                 extra_env=elastic_env(hosts, ssh_with_keepalives(hosts, str(tmp_path / "kabin"))), opts=opts)

    def ranks():  # (step, ranks) of every log line, in the order written
        return [(r["step"], r["ranks"]) for r in metrics(run_dir)]

    def regrown():  # the log lines on 2 ranks after the first one on 1 rank
        seq = [n for _, n in ranks()]
        return seq[seq.index(1):].count(2) if 1 in seq else 0
    wait_until(env, job, "step 20 on 2 ranks", lambda: any(s >= 20 and n == 2 for s, n in ranks()), 120, 0.2)
    # rank 0 on the batch host, where horovodrun's driver runs (`discover` names it alone first)
    assert [p["node"] for p in placement(run_dir)] == ["h1", "h2"]
    cut_at = max(s for s, _ in ranks())
    t_cut = time.monotonic()
    testhosts.cut(hosts["dir"], "h2")
    try:
        wait_until(env, job, "the job going on without h2", lambda: "elastic: rank 0 of 1 now" in output(job),
                   GLOO_TIMEOUT_S + 20, 0.2)
        t_shrink = time.monotonic()
        testhosts.revive(hosts["dir"], "h2", env)
        t_back = time.monotonic()
        assert "h2" in expand_nodelist(job_field(env, job, "NodeList")), \
            f"Slurm took h2 out of the job (DOWN) before it was back: cut -> back {t_back - t_cut:.1f} s"
        wait_until(env, job, "a rank joining on h2", lambda: "joined the job on h2" in output(job), 60, 0.2)
        t_join = time.monotonic()
        wait_until(env, job, "10 steps on 2 ranks again", lambda: regrown() >= 10, 60, 0.2)
        t_two = time.monotonic()
        out, seq = output(job), ranks()
        commit = int(out.split("elastic: rank 0 of 1 now")[1].split("resumes from the commit at step ")[1].split(";")[0])
        assert commit % 5 == 0 and cut_at - 10 <= commit <= cut_at + 10, (commit, cut_at)  # the last commit
        first1 = [n for _, n in seq].index(1)
        assert seq[first1][0] == commit + 1, seq[first1 - 5:first1 + 5]  # alone, from the commit on
        first2 = first1 + [n for _, n in seq[first1:]].index(2)
        assert seq[first2][0] == seq[first2 - 1][0] + 1, seq[first2 - 5:first2 + 5]  # 2 ranks, from where it was
        assert all(math.isfinite(r["train_loss"]) for r in metrics(run_dir))
        assert "joined the job on h2; built its DALI pipeline (shard 1 of 2) and starts from the commit at step " \
               f"{seq[first2 - 1][0]}" in out, out[-3000:]
        assert "elastic: rank 0 of 2 now" in out  # h1's rank rebuilt its reader for 2 ranks too
        print(f"\nHOSTS_TIMES elastic: cut -> going on alone {t_shrink - t_cut:.1f} s (Gloo timeout "
              f"{GLOO_TIMEOUT_S} s); revive {t_back - t_shrink:.1f} s; back -> rank joined {t_join - t_back:.1f} s "
              f"(cooldown 4-6 s), -> 10 steps on 2 ranks {t_two - t_back:.1f} s; start -> end of checks "
              f"{t_two - t0:.1f} s")
    finally:
        subprocess.run(["scancel", job], env=env)
        wait_job(env, job, timeout_s=60)
        if testhosts.node_state(env, "h2") not in ("idle", "mixed"):
            testhosts.revive(hosts["dir"], "h2", env)
