"""What the Slurm tests share: a test cluster as a module fixture (started in a temporary
folder, stopped by PID, no daemon left), and submitting, watching and reading jobs
(there is no sacct without a database: scontrol is polled)."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time

import pytest

from tests.clusters import testcluster
from tests.conftest import ROOT

TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "PREEMPTED", "BOOT_FAIL",
            "DEADLINE"}


def drain(env, timeout_s=60) -> None:
    """Cancel every job and let them end while the daemons live (SIGTERM, a checkpoint,
    KillWait): a job whose slurmd is gone is never cleaned up, and its processes outlive
    the test."""
    subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], env=env, capture_output=True)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and subprocess.run(["squeue", "-h"], env=env, capture_output=True,
                                                         text=True).stdout.strip():
        time.sleep(0.5)


def assert_nothing_left(d: str, killed: list) -> None:
    leftovers = subprocess.run(["pgrep", "-f", d], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes still running after teardown: {leftovers}"
    assert not killed, f"needed SIGKILL to stop: {killed}"


def cluster_fixture(nodes: int):
    """A module-scoped fixture: the cluster's client environment; torn down by PID at the
    end, also when a test fails, asserting that no daemon is left."""
    @pytest.fixture(scope="module")
    def cluster():
        d = tempfile.mkdtemp(prefix=f"hvdslurm{nodes}-")
        try:
            env = testcluster.up(d, nodes=nodes)
        except Exception:
            testcluster.down(d)
            raise
        yield env
        drain(env)
        assert_nothing_left(d, testcluster.down(d))
    return cluster


def sbatch(env, script, *args, extra_env=None, opts=()):
    """Submit launch/<script> from the repository root (script None: `opts` hold a
    --wrap); returns the job id."""
    cmd = [os.path.join("launch", script), *args] if script else ["--output=runs/slurm-%j.out"]
    r = subprocess.run(["sbatch", "--parsable", *opts, *cmd], cwd=ROOT,
                       env={**env, **(extra_env or {})}, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout.strip().split(";")[0]


def job_field(env, job, field):
    out = subprocess.run(["scontrol", "show", "job", "-o", job], env=env, capture_output=True, text=True).stdout
    for part in out.split():
        if part.startswith(field + "="):
            return part.split("=", 1)[1]
    return None


def output(job) -> str:
    path = os.path.join(ROOT, "runs", f"slurm-{job}.out")
    return open(path, errors="replace").read() if os.path.exists(path) else ""


def wait_job(env, job, timeout_s=420):
    """Poll until the job ends; (state, its output). A job still running at the
    deadline is cancelled and the test fails."""
    deadline, state = time.monotonic() + timeout_s, None
    while time.monotonic() < deadline:
        state = job_field(env, job, "JobState")
        if state in TERMINAL:
            return state, output(job)
        time.sleep(0.5)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job} still {state} after {timeout_s}s:\n{output(job)[-3000:]}")


def wait_until(env, job, what, ok, timeout_s, poll_s=0.2):
    """Poll `ok()` while the job lives; past `timeout_s`, or if the job ended first,
    cancel it and fail with its output: a wait never falls through."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        state = job_field(env, job, "JobState")
        if state in TERMINAL:
            pytest.fail(f"job {job} ended ({state}) before {what}\n{output(job)[-3000:]}")
        time.sleep(poll_s)
    subprocess.run(["scancel", job], env=env)
    pytest.fail(f"job {job}: {what}: not within {timeout_s:.0f} s\n{output(job)[-3000:]}")


def wait_output(env, job, text, timeout_s=180) -> str:
    """Wait until the job's output contains `text` (training has started, ...); its output."""
    wait_until(env, job, f"printing {text!r}", lambda: text in output(job), timeout_s, poll_s=0.3)
    return output(job)


def pids_matching(marker: str) -> list[str]:
    return subprocess.run(["pgrep", "-f", marker], capture_output=True, text=True).stdout.split()


def running(pid) -> bool:
    """The process exists and is not a zombie (an exited child nobody reaped yet)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def wait_gone(marker: str, timeout_s=30, pids=()) -> list[str]:
    """Processes still running after `timeout_s` whose command line holds `marker`, or
    that are among `pids` (none: [])."""
    deadline = time.monotonic() + timeout_s

    def left():
        return sorted({*pids_matching(marker), *(str(p) for p in pids if running(p))})
    procs = left()
    while procs and time.monotonic() < deadline:
        time.sleep(0.3)
        procs = left()
    return procs
