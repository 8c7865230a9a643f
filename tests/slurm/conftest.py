"""The two-node test cluster (n1, n2 on loopback: launch/testcluster.py), with names that
resolve and an sshd on "n2" (launch/testnet.py) so horovodrun can start ranks there."""
import os
import subprocess
import tempfile

import pytest

from launch import testcluster, testnet


@pytest.fixture(scope="module")
def two_nodes():
    """{"env": client environment, "dir": cluster folder, "ssh": testnet.up's answer}; all
    daemons are stopped by PID at the end and none may be left."""
    d = tempfile.mkdtemp(prefix="hvdslurm2-")
    try:
        env = testcluster.up(d, nodes=2)
        net = testnet.up(d)
    except Exception:
        testnet.down(d)
        testcluster.down(d)
        raise
    yield {"env": env, "dir": d, "ssh": net}
    subprocess.run(["scancel", "--user", os.environ.get("USER", "root")], env=env, capture_output=True)
    ssh_killed = testnet.down(d)
    killed = testcluster.down(d)
    leftovers = subprocess.run(["pgrep", "-f", d], capture_output=True, text=True).stdout.split()
    assert not leftovers, f"processes still running after teardown: {leftovers}"
    assert not killed and not ssh_killed, f"needed SIGKILL to stop: {killed or ['sshd']}"
