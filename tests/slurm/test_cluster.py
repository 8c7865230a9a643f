"""The real launch/*.sbatch scripts, submitted with sbatch to a real one-node Slurm
cluster (munged + slurmctld + slurmd on loopback, tests/clusters/testcluster.py). The cluster is
torn down by PID at the end, also when a test fails."""
import json
import os
import subprocess

import webdataset as wds

from tests.conftest import ROOT, jpeg
from tests.slurm.jobs import cluster_fixture, job_field, sbatch, wait_gone, wait_job, wait_output


cluster = cluster_fixture(nodes=1)


def test_sanity_sbatch_two_tasks_completes_with_report(cluster, synth_data):
    job = sbatch(cluster, "sanity.sbatch", "--preset", "ci", f"--data.train={synth_data}/train")
    state, out = wait_job(cluster, job)
    assert state == "COMPLETED", out[-3000:]
    assert "verdict: GO" in out and f"slurm   job {job} (hvdtrain-sanity)" in out
    rep = json.load(open(os.path.join(ROOT, "runs", f"slurm-{job}", "sanity.json")))
    assert rep["ranks"] == 2 and rep["verdict"] == "GO" and rep["slurm"]["slurm_job_id"] == job
    assert job_field(cluster, job, "NumTasks") == "2"


def test_srun_launcher_each_task_is_a_rank(cluster, synth_data):
    job = sbatch(cluster, "sanity.sbatch", "--preset", "ci", f"--data.train={synth_data}/train",
                 extra_env={"LAUNCHER": "srun"})
    state, out = wait_job(cluster, job)
    assert state == "COMPLETED", out[-3000:]
    assert "launcher srun" in out and "ranks   2 x cpu" in out
    assert json.load(open(os.path.join(ROOT, "runs", f"slurm-{job}", "sanity.json")))["ranks"] == 2


def test_failing_training_job_ends_failed_with_its_error(cluster, tmp_path):
    with wds.ShardWriter(str(tmp_path / "bad-%06d.tar"), maxcount=100) as sink:
        for i in range(40):
            sink.write({"__key__": f"k{i:04d}", "jpg": jpeg(i), "cls": "cat"})  # not a class index
    job = sbatch(cluster, "train.sbatch", "--preset", "ci", f"--data.train={tmp_path}/bad-000000.tar")
    state, out = wait_job(cluster, job)
    assert state == "FAILED", out[-3000:]
    assert "label b'cat' is not a decimal class index" in out and "bad-000000.tar" in out
    assert job_field(cluster, job, "ExitCode") != "0:0"


def test_scancel_leaves_no_stray_processes(cluster, synth_data, tmp_path):
    marker = str(tmp_path / "cancel-me")
    job = sbatch(cluster, "sanity.sbatch", "--preset", "ci", "--train.steps=100000",
                 f"--data.train={synth_data}/train", f"--run.dir={marker}")
    wait_output(cluster, job, "step ", timeout_s=120)  # training has started on both ranks
    procs = subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()
    assert len(procs) >= 3, "expected horovodrun and two ranks running"
    subprocess.run(["scancel", job], env=cluster, check=True)
    state, _ = wait_job(cluster, job, timeout_s=60)
    assert state == "CANCELLED"
    procs = wait_gone(marker)
    assert not procs, f"processes left after scancel: {procs}"


def test_dry_run_job_prints_command_and_runs_nothing(cluster):
    job = sbatch(cluster, "train.sbatch", "--preset", "ci", "--optim.lr=0.2", extra_env={"DRY_RUN": "1"})
    state, out = wait_job(cluster, job, timeout_s=60)
    assert state == "COMPLETED"
    assert f"-m hvdtrain.train --preset ci --optim.lr=0.2 --run.dir=runs/slurm-{job}" in out
    assert not os.path.exists(os.path.join(ROOT, "runs", f"slurm-{job}"))
