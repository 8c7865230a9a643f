"""The e2e tests' way to run a command: its own process group, a timeout that kills
the whole group (launcher and ranks) and fails the test, so a hung collective cannot
hang CI."""
import json
import os
import subprocess
import sys
import time

import pytest

from hvdtrain.procs import kill_tree
from tests.conftest import ROOT

BIN = os.path.dirname(sys.executable)
# --gloo: no MPI probe (a child process importing torch: 3.4 s per launch here); see the Makefile
HOROVODRUN = [os.path.join(BIN, "horovodrun"), "--gloo", "-np", "2", "-H", "localhost:2"]
TRAIN = [sys.executable, "-m", "hvdtrain.train"]
CI = ["--preset", "ci", "--task", "classify", "--run.progress=False", "--run.tensorboard=False"]


def hvd(np_):
    return [os.path.join(BIN, "horovodrun"), "--gloo", "-np", str(np_), "-H", f"localhost:{np_}"]


def losses(run_dir) -> dict[int, float]:
    """step -> train loss (mean over ranks); a resumed run's later record of a step wins."""
    out = {}
    for line in open(os.path.join(run_dir, "metrics.jsonl")):
        rec = json.loads(line)
        if "train_loss" in rec:
            out[rec["step"]] = rec["train_loss"]
    return out


def exit_code(r) -> int | None:
    """The rank's exit status: horovodrun itself exits 1 and names the first failing rank's code."""
    if r.returncode == 0:
        return 0
    marker = "Exit code: "
    return int(r.stderr.rsplit(marker, 1)[1].split()[0]) if marker in r.stderr else None


def wait_for(what: str, ok, timeout_s: float, p: subprocess.Popen | None = None, poll_s: float = 0.1) -> None:
    """Poll `ok()` until it holds; past `timeout_s` (or if the job `p` ended first) kill the
    job and fail the test saying what never happened — a wait never falls through."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        if p is not None and p.poll() is not None:
            kill_job(p.pid)  # ranks may outlive the launcher and hold its pipes open
            try:
                out = "".join(x or "" for x in p.communicate(timeout=10))
            except (subprocess.TimeoutExpired, ValueError):
                out = "(no output could be read)"
            pytest.fail(f"the job ended (exit {p.returncode}) before {what}\n{out[-3000:]}")
        time.sleep(poll_s)
    if p is not None:
        kill_job(p.pid)
    pytest.fail(f"{what}: not within {timeout_s:.0f} s")


def run(cmd, timeout=300, env=None):
    """Run in its own process group; past `timeout` the whole group (launcher and ranks)
    gets SIGKILL and the test fails, so a hung collective cannot hang CI."""
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True, env=env)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_job(p.pid)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{(out + err)[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)


def finish(p: subprocess.Popen, limit_s: float, what: str = "the job did not end") -> tuple[str, str]:
    """(stdout, stderr) of `p` once it ends; past `limit_s` the whole tree is killed and
    the test fails."""
    try:
        return p.communicate(timeout=limit_s)
    except subprocess.TimeoutExpired:
        kill_job(p.pid)
        p.communicate()
        pytest.fail(f"{what} within {limit_s} s")


def kill_job(pid: int) -> None:
    """SIGKILL a launcher and every process below it, at once. killpg is not enough:
    horovodrun starts each rank in a session of its own (its middleman calls setsid), and
    a rank that outlives its launcher sees SIGTERM or a broken stdout pipe and may clean
    up, which is not what a kill -9 of the job tests. (hvdtrain.procs.kill_tree: the same
    for make gpu-check's steps.)"""
    kill_tree(pid)
