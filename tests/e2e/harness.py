"""The e2e tests' way to run a command: its own process group, a timeout that kills
the whole group (launcher and ranks) and fails the test, so a hung collective cannot
hang CI."""
import os
import signal
import subprocess
import sys

import psutil
import pytest

from tests.conftest import ROOT

BIN = os.path.dirname(sys.executable)
HOROVODRUN = [os.path.join(BIN, "horovodrun"), "-np", "2", "-H", "localhost:2"]
TRAIN = [sys.executable, "-m", "hvdtrain.train"]


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


def kill_job(pid: int) -> None:
    """SIGKILL a launcher and every process below it, at once. killpg is not enough:
    horovodrun starts each rank in a session of its own (its middleman calls setsid), and
    a rank that outlives its launcher sees SIGTERM or a broken stdout pipe and may clean
    up, which is not what a kill -9 of the job tests."""
    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGSTOP, signal.SIGKILL):  # freeze the tree first: no one reacts to the others' deaths
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
