"""Two Slurm nodes (n1, n2: two slurmd on loopback, tests/slurm/conftest.py), the real
launch/*.sbatch scripts, both launchers: srun (each task a rank, no ssh) and horovodrun
(rank 1 started on n2 over ssh). Results are compared with the one-node 2-rank run, not
speeds: both nodes share this machine's cores."""
import json
import os
import signal
import subprocess
import time

import pytest

from hvdtrain import checkpoint as ckpt
from tests.conftest import ROOT
from tests.e2e.harness import losses
from tests.slurm.jobs import job_field, pids_matching, running, sbatch, wait_gone, wait_job, wait_output

# one torch thread per rank in every layout: the same arithmetic, so losses compare to the bit
SAME_MATH = ["--train.torch_threads=1"]
TWO_BY_ONE = ("--nodes=2", "--ntasks-per-node=1")
ONE_BY_TWO = ("--nodes=1", "--ntasks-per-node=2")


def report(job) -> dict:
    return json.load(open(os.path.join(ROOT, "runs", f"slurm-{job}", "sanity.json")))


def launcher_env(two_nodes, launcher: str) -> dict:
    if launcher == "srun":
        return {"LAUNCHER": "srun"}
    ssh = two_nodes["ssh"]
    return {"LAUNCHER": "horovodrun", "PATH": f"{ssh['path']}:{os.environ['PATH']}",
            "HOROVODRUN_ARGS": f"--ssh-port {ssh['port']} --ssh-identity-file {ssh['identity']}"}


def sanity_job(two_nodes, data, opts, launcher="srun"):
    job = sbatch(two_nodes["env"], "sanity.sbatch", "--preset", "ci", f"--data.train={data}/train", *SAME_MATH,
                 extra_env=launcher_env(two_nodes, launcher), opts=opts)
    state, out = wait_job(two_nodes["env"], job)
    assert state == "COMPLETED", out[-3000:]
    assert "verdict: GO" in out, out[-3000:]
    return job, out


@pytest.fixture(scope="module")
def one_node(two_nodes, synth_data):
    """The reference: the same sanity with 2 ranks on one node."""
    job, _ = sanity_job(two_nodes, synth_data, ONE_BY_TWO)
    rep = report(job)
    assert [p["node"] for p in rep["placement"]] == ["n1", "n1"]
    return rep


def assert_one_rank_per_node(rep):
    got = [(p["rank"], p["node"], p["local_rank"], p["local_size"], p["cross_rank"], p["cross_size"])
           for p in rep["placement"]]
    assert got == [(0, "n1", 0, 1, 0, 2), (1, "n2", 0, 1, 1, 2)], got
    assert rep["nodes"] == ["n1", "n2"] and rep["slurm"]["slurm_job_nodelist"] == "n[1-2]"


@pytest.mark.parametrize("launcher", ["srun", "horovodrun"])
def test_sanity_across_two_nodes_equals_one_node(two_nodes, synth_data, one_node, launcher):
    job, out = sanity_job(two_nodes, synth_data, TWO_BY_ONE, launcher)
    rep = report(job)
    assert_one_rank_per_node(rep)
    assert "nodes   n1: rank 0 (local 0/1); n2: rank 1 (local 0/1); 2 node(s), cross size 2" in out
    assert f"launcher {launcher}" in out
    assert rep["loss_per_step"] == pytest.approx(one_node["loss_per_step"], rel=1e-6, abs=1e-7)
    if launcher == "horovodrun":  # rank 1 really came in over ssh
        log = open(os.path.join(two_nodes["dir"], "ssh", "sshd.log")).read()
        assert "Accepted publickey for root" in log, log[-2000:]


def test_four_ranks_two_per_node_read_every_sample_once(two_nodes, synth_data, tmp_path):
    out = tmp_path / "probe.json"
    job = sbatch(two_nodes["env"], None, extra_env={"LAUNCHER": "srun"},
                 opts=("--nodes=2", "--ntasks-per-node=2", "--job-name=epoch-probe",
                       f"--wrap=exec launch/slurm_run.sh tests.slurm.epoch_probe {out} --preset ci "
                       f"--data.train={synth_data}/train --train.batch_size=16"))
    state, text = wait_job(two_nodes["env"], job)
    assert state == "COMPLETED", text[-3000:]
    ranks = json.load(open(out))["ranks"]
    assert [(r["rank"], r["node"], r["local_rank"], r["local_size"], r["cross_size"]) for r in ranks] == [
        (0, "n1", 0, 2, 2), (1, "n1", 1, 2, 2), (2, "n2", 0, 2, 2), (3, "n2", 1, 2, 2)]
    assert [(r["shard_id"], r["num_shards"]) for r in ranks] == [(i, 4) for i in range(4)]
    keys = [r["keys"] for r in ranks]
    assert [len(k) for k in keys] == [64] * 4  # 256 samples / 4 ranks, batches of 16
    seen = [k for ks in keys for k in ks]
    assert len(set(seen)) == len(seen) == 256, "a sample was read twice, or one was never read"


def start_training(two_nodes, data, run_dir, steps, launcher="srun", opts=TWO_BY_ONE, more=()):
    args = ["--preset", "ci", f"--data.train={data}/train", f"--train.steps={steps}", "--train.ckpt_every=4",
            "--train.log_every=2", "--run.progress=False", "--run.tensorboard=False", f"--run.dir={run_dir}",
            *SAME_MATH, *more]
    return sbatch(two_nodes["env"], "train.sbatch", *args, extra_env=launcher_env(two_nodes, launcher), opts=opts)


def test_lost_node_ends_the_job_and_its_checkpoint_resumes(two_nodes, synth_data, tmp_path):
    env, run_dir = two_nodes["env"], str(tmp_path / "lost")
    job = start_training(two_nodes, synth_data, run_dir, steps=160)
    wait_output(env, job, "step ", timeout_s=180)
    deadline = time.monotonic() + 120
    while not ckpt.list_checkpoints(run_dir):
        assert time.monotonic() < deadline, "no checkpoint 120s after training started"
        time.sleep(0.2)
    placement = json.load(open(os.path.join(run_dir, "config.json")))["placement"]
    assert placement[1]["node"] == "n2"
    os.kill(placement[1]["pid"], signal.SIGKILL)  # rank 1, on n2, goes away
    t_kill = time.monotonic()
    state, out = wait_job(env, job, timeout_s=90)
    ended_s = time.monotonic() - t_kill
    assert state == "FAILED", out[-3000:]
    assert "n2: task 1: Killed" in out, out[-3000:]  # srun names the node and the rank
    assert ended_s < 60, f"the job took {ended_s:.1f}s to end after rank 1 was lost"
    print(f"lost node: job ended {ended_s:.2f}s after the kill")
    newest = ckpt.list_checkpoints(run_dir)[-1]
    step = ckpt.load(newest)["step"]
    assert step >= 4
    assert not pids_matching(run_dir)

    # continue on one node, 2 ranks: the same config (world size included), so no --resume-anyway
    again = start_training(two_nodes, synth_data, run_dir, steps=160, opts=ONE_BY_TWO, more=("--resume", "auto"))
    state, out = wait_job(env, again)
    assert state == "COMPLETED", out[-3000:]
    assert f"resume: {newest} (step {step}" in out, out[-3000:]
    assert max(losses(run_dir)) == 160 and min(losses(run_dir)) < step


@pytest.mark.parametrize("launcher", ["srun", "horovodrun"])
def test_scancel_of_a_two_node_job_leaves_nothing_on_either_node(two_nodes, synth_data, tmp_path, launcher):
    env, run_dir = two_nodes["env"], str(tmp_path / f"cancel-{launcher}")
    job = start_training(two_nodes, synth_data, run_dir, steps=100_000, launcher=launcher)
    wait_output(env, job, "step ", timeout_s=180)
    ranks = json.load(open(os.path.join(run_dir, "config.json")))["placement"]
    assert [p["node"] for p in ranks] == ["n1", "n2"]
    assert all(running(p["pid"]) for p in ranks)
    assert job_field(env, job, "JobState") == "RUNNING"
    subprocess.run(["scancel", job], env=env, check=True, timeout=30)
    state, _ = wait_job(env, job, timeout_s=60)
    assert state == "CANCELLED"
    left = wait_gone(run_dir, timeout_s=30, pids=[p["pid"] for p in ranks])
    assert not left, f"processes left after scancel: {left}"

