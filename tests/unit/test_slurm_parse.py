"""launch/slurm.py: Slurm's nodelist and tasks-per-node forms, and the launch commands."""
import os
import subprocess
import sys

import pytest

from launch.slurm import (SlurmEnvError, allocation, check_elastic_ssh, discover, elastic_command, expand_nodelist,
                          expand_tasks_per_node, horovod_hosts, horovodrun_command, is_elastic, srun_command,
                          ssh_port, task_env)
from tests.conftest import ROOT


@pytest.mark.parametrize("nodelist,hosts", [
    ("vm", ["vm"]),
    ("node[01-03,07]", ["node01", "node02", "node03", "node07"]),
    ("node[01-03,07],gpu5", ["node01", "node02", "node03", "node07", "gpu5"]),
    ("a[8-11]", ["a8", "a9", "a10", "a11"]),
    ("rack[1-2]-n[1-2]", ["rack1-n1", "rack1-n2", "rack2-n1", "rack2-n2"]),
    ("x[009-011],y[1]", ["x009", "x010", "x011", "y1"]),
])
def test_nodelist_forms(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


@pytest.mark.parametrize("bad", ["node[01-03", "node]1[", "node[3-1]", "node[a-b]", ""])
def test_bad_nodelists_are_errors(bad):
    with pytest.raises(SlurmEnvError):
        expand_nodelist(bad)


def test_tasks_per_node_forms():
    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1]
    assert expand_tasks_per_node("4") == [4]
    assert expand_tasks_per_node("1,2(x2)") == [1, 2, 2]
    with pytest.raises(SlurmEnvError, match="bad SLURM_TASKS_PER_NODE item"):
        expand_tasks_per_node("2(3)")


def test_allocation_multi_node_and_commands():
    env = {"SLURM_JOB_NODELIST": "node[01-03,07]", "SLURM_TASKS_PER_NODE": "2(x3),1", "SLURM_NTASKS": "7"}
    alloc = allocation(env)
    assert alloc == [("node01", 2), ("node02", 2), ("node03", 2), ("node07", 1)]
    assert horovod_hosts(alloc) == "node01:2,node02:2,node03:2,node07:1"
    assert horovodrun_command(alloc, "py", "hvdtrain.train", ["--seed=1"]) == [
        "horovodrun", "--gloo", "-np", "7", "-H", "node01:2,node02:2,node03:2,node07:1", "py", "-m", "hvdtrain.train",
        "--seed=1"]
    assert horovodrun_command(alloc, "py", "m", [], extra="--ssh-port 2222 --ssh-identity-file '/k ey'")[:6] == [
        "horovodrun", "--gloo", "--ssh-port", "2222", "--ssh-identity-file", "/k ey"]
    assert srun_command(alloc, "py", "m", [])[:2] == ["srun", "--ntasks=7"]
    assert allocation({"SLURM_JOB_NODELIST": "n[1-2]", "SLURM_NTASKS_PER_NODE": "4"}) == [("n1", 4), ("n2", 4)]


@pytest.mark.parametrize("env,msg", [
    ({}, "not inside a Slurm job"),
    ({"SLURM_JOB_NODELIST": "n[1-3]", "SLURM_TASKS_PER_NODE": "2(x2)"}, "3 nodes .* but 2 task counts"),
    ({"SLURM_JOB_NODELIST": "n1", "SLURM_TASKS_PER_NODE": "2", "SLURM_NTASKS": "3"}, "SLURM_NTASKS=3"),
])
def test_inconsistent_allocations_are_errors(env, msg):
    with pytest.raises(SlurmEnvError, match=msg):
        allocation(env)


def test_srun_task_env_ranks_for_uneven_nodes():
    alloc = [("a", 2), ("b", 2), ("c", 1)]
    base = {"CUDA_VISIBLE_DEVICES": "0"}  # set: left alone
    # task 4 = node c, local 0; local rank 1 exists only on a and b
    e = task_env({**base, "SLURM_PROCID": "4", "SLURM_LOCALID": "0", "SLURM_NODEID": "2"}, alloc, "a", 999)
    assert (e["HOROVOD_RANK"], e["HOROVOD_SIZE"], e["HOROVOD_LOCAL_SIZE"]) == ("4", "5", "1")
    assert (e["HOROVOD_CROSS_RANK"], e["HOROVOD_CROSS_SIZE"], e["HOROVOD_HOSTNAME"]) == ("2", "3", "c")
    e = task_env({**base, "SLURM_PROCID": "3", "SLURM_LOCALID": "1", "SLURM_NODEID": "1"}, alloc, "a", 999)
    assert (e["HOROVOD_CROSS_RANK"], e["HOROVOD_CROSS_SIZE"]) == ("1", "2")
    assert e["HOROVOD_GLOO_RENDEZVOUS_PORT"] == "999" and "CUDA_VISIBLE_DEVICES" not in e


def test_dry_run_prints_command_and_env_without_running():
    env = {**os.environ, "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "node[01-02]", "SLURM_TASKS_PER_NODE": "2(x2)",
           "SLURM_NTASKS": "4", "SLURM_SUBMIT_DIR": ROOT, "DRY_RUN": "1"}
    r = subprocess.run([os.path.join(ROOT, "launch", "train.sbatch"), "--preset", "ci", "--optim.lr=0.2"],
                       env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    cmd = [line for line in r.stdout.splitlines() if line.startswith("DRY_RUN: ") and "-m hvdtrain.train" in line]
    assert len(cmd) == 1
    assert "horovodrun --gloo -np 4 -H node01:2,node02:2" in cmd[0]
    assert cmd[0].endswith("-m hvdtrain.train --preset ci --optim.lr=0.2 --run.dir=runs/slurm-42")
    assert "DRY_RUN: env SLURM_JOB_ID=42" in r.stdout
    r = subprocess.run([os.path.join(ROOT, "launch", "local.sh"), "2", "hvdtrain.sanity", "--preset", "ci"],
                       env={**os.environ, "DRY_RUN": "1"}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "horovodrun --gloo -np 2 -H localhost:2" in r.stdout


def test_sbatch_scripts_hold_no_hyperparameters():
    for name in ("sanity", "train", "bench"):
        text = open(os.path.join(ROOT, "launch", f"{name}.sbatch")).read()
        body = [l for l in text.splitlines() if not l.startswith("#")]
        assert body == [f'exec "${{HVDTRAIN_ROOT:-$SLURM_SUBMIT_DIR}}/launch/slurm_run.sh" '
                        f'{ {"sanity": "hvdtrain.sanity", "train": "hvdtrain.train", "bench": "bench.loader"}[name]} "$@"']
        assert "#SBATCH --output=runs/slurm-%j.out" in text


def test_placement_line_names_each_node_and_its_ranks():
    from hvdtrain.provenance import describe_placement

    def p(rank, node, local, size, cross):
        return {"rank": rank, "node": node, "local_rank": local, "local_size": size, "cross_rank": 0,
                "cross_size": cross, "pid": 1}
    assert describe_placement([p(0, "n1", 0, 2, 2), p(1, "n1", 1, 2, 2), p(2, "n2", 0, 2, 2), p(3, "n2", 1, 2, 2)]) \
        == "n1: rank 0,1 (local 0,1/2); n2: rank 2,3 (local 0,1/2); 2 node(s), cross size 2"
    assert describe_placement([p(0, "localhost", 0, 1, 1)]) == "localhost: rank 0 (local 0/1); 1 node(s), cross size 1"


def test_cores_per_rank_honours_slurm_cpus_per_task(monkeypatch):
    """Without task affinity every Slurm task sees the whole node: --cpus-per-task caps it."""
    from hvdtrain import dist

    monkeypatch.setattr(dist, "local_size", lambda: 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    monkeypatch.delenv("SLURM_CPUS_PER_TASK", raising=False)
    assert dist.cores_per_rank() == 8
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "3")
    assert dist.cores_per_rank() == 3
    monkeypatch.setenv("SLURM_CPUS_PER_TASK", "16")  # never more than the affinity set's share
    assert dist.cores_per_rank() == 8
    monkeypatch.setattr(dist, "local_size", lambda: 4)
    assert dist.cores_per_rank() == 2


def test_elastic_command_uses_the_discovery_script_and_the_cooldown():
    alloc = allocation({"SLURM_JOB_NODELIST": "h[1-3]", "SLURM_TASKS_PER_NODE": "2(x3)"})
    assert is_elastic(["--preset", "ci", "--elastic"]) and is_elastic(["--train.elastic=True"])
    assert not is_elastic(["--train.elastic=False"])
    line = elastic_command(alloc, "/v/py", "hvdtrain.train", ["--elastic"], extra="--ssh-port 2222")
    assert line == ["horovodrun", "--gloo", "--ssh-port", "2222", "-np", "6", "--min-np", "2", "--max-np", "6",
                    "--host-discovery-script", "/v/py -m launch.slurm discover", "--blacklist-cooldown-range", "10",
                    "300", "/v/py", "-m", "hvdtrain.train", "--elastic"]
    assert "-H" not in line
    assert elastic_command(alloc, "py", "m", [], min_np=1, cooldown="2 10")[4:6] == ["--min-np", "1"]
    assert "/v/py -m launch.slurm discover '/r un/.d'" in elastic_command(alloc, "/v/py", "m", [], mark="/r un/.d")
    with pytest.raises(SlurmEnvError, match="ELASTIC_MIN_NP=7"):
        elastic_command(alloc, "py", "m", [], min_np=7)
    with pytest.raises(SlurmEnvError, match="ELASTIC_COOLDOWN"):
        elastic_command(alloc, "py", "m", [], cooldown="10")
    assert ssh_port("--ssh-port 2222 --ssh-identity-file k") == 2222 and ssh_port("") == 22


def test_elastic_across_nodes_is_refused_without_ssh_keepalives(tmp_path):
    """`ssh -G` (the real ssh) tells the options horovodrun's ssh would get: a wrapper
    first on PATH stands for a cluster's ~/.ssh/config."""
    alloc = [("h1", 1), ("h2", 1)]

    def path_with(opts):
        d = tmp_path / f"bin{len(list(tmp_path.iterdir()))}"
        d.mkdir()
        (d / "ssh").write_text(f'#!/bin/sh\nexec /usr/bin/ssh -F none {opts} "$@"\n')
        (d / "ssh").chmod(0o755)
        return {**os.environ, "PATH": f"{d}:{os.environ['PATH']}"}
    with pytest.raises(SlurmEnvError, match=r"needs ssh keepalives, and `ssh -G h2` says serveraliveinterval 0.*"
                                            r"horovod/runner/util/remote.py:18"):
        check_elastic_ssh(alloc, here="h1", env=path_with(""))
    check_elastic_ssh(alloc, here="h1", env=path_with("-o ServerAliveInterval=5"))
    check_elastic_ssh([("h1", 2)], here="h1", env=path_with(""))  # one node: no ssh at all


def test_discover_names_the_batch_host_alone_first(tmp_path):
    """Horovod keeps the order it first sees hosts in (rank 0 on the first): the first call
    names only this node and leaves the mark; the later ones ask scontrol."""
    env = {"SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "h[1-2]", "SLURM_TASKS_PER_NODE": "2(x2)"}
    mark = str(tmp_path / "run" / ".discovered-42.0")
    assert discover(env, mark=mark, here="h1") == [("h1", 2)]
    assert os.path.exists(mark)


def test_elastic_under_srun_is_refused():
    env = {**os.environ, "SLURM_JOB_ID": "42", "SLURM_JOB_NODELIST": "n[1-2]", "SLURM_TASKS_PER_NODE": "1(x2)",
           "LAUNCHER": "srun"}
    r = subprocess.run([sys.executable, "-m", "launch.slurm", "command", "hvdtrain.train",
                        "--elastic"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--elastic needs LAUNCHER=horovodrun" in r.stderr, r.stderr
