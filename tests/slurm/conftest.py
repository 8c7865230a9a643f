"""The two-node test cluster (n1, n2 on loopback: launch/testcluster.py), with names that
resolve and an sshd on "n2" (launch/testnet.py) so horovodrun can start ranks there."""
import tempfile

import pytest

from launch import testcluster, testnet
from tests.slurm.jobs import assert_nothing_left, drain


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
    drain(env)
    ssh_killed = testnet.down(d)
    assert_nothing_left(d, testcluster.down(d) + (["sshd"] if ssh_killed else []))
