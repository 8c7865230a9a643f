"""The e2e tests' way to run a command: its own process group, a timeout that kills
the whole group (launcher and ranks) and fails the test, so a hung collective cannot
hang CI."""
import os
import signal
import subprocess
import sys

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
        os.killpg(p.pid, signal.SIGKILL)
        out, err = p.communicate()
        pytest.fail(f"timed out after {timeout}s: {' '.join(cmd)}\n{(out + err)[-3000:]}")
    return subprocess.CompletedProcess(cmd, p.returncode, out, err)
