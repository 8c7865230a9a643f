"""The two-node test cluster (n1, n2 on loopback: tests/clusters/testcluster.py), with names that
resolve and an sshd on "n2" (tests/clusters/testnet.py) so horovodrun can start ranks there."""
import os
import tempfile

import pytest

from tests.clusters import testcluster, testnet
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


@pytest.fixture(scope="module")
def hosts():
    """Three Slurm nodes h1..h3, each a network namespace of its own (tests/clusters/testhosts.py):
    testhosts.up's answer. Skipped with the reason where namespaces cannot be made, unless
    HVDTRAIN_REQUIRE_NETNS=1 (.ci/run), which makes that a failure. At the end every job is
    cancelled, and the namespaces, links, /etc/hosts lines and daemons must all be gone."""
    from tests.clusters import testhosts

    why = testhosts.capable()
    if why:
        if os.environ.get("HVDTRAIN_REQUIRE_NETNS") == "1":
            pytest.fail(f"HVDTRAIN_REQUIRE_NETNS=1 but {why}")
        pytest.skip(f"test hosts in network namespaces: {why}")
    d = tempfile.mkdtemp(prefix="hvdhosts-")
    cluster = testhosts.up(d, nodes=3)  # removes what it made if it fails
    try:
        yield cluster
    finally:
        drain(cluster["env"])
        killed = testhosts.down(d)
        left = testhosts.leftovers(d)
        assert not left, f"left behind by the test hosts: {left}"
        assert not killed, f"needed SIGKILL to stop: {killed}"
