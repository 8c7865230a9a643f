"""A Slurm cluster on loopback, for tests: munged + slurmctld + one slurmd per node.

    python -m tests.clusters.testcluster up DIR [--nodes 2]   # prints `export SLURM_CONF=DIR/slurm.conf`
    python -m tests.clusters.testcluster down DIR

One node (the default) is this host under its own name, with all its cores. Two nodes
are `n1` and `n2`: two `slurmd -N nK` daemons on one host, each on its own loopback port
(`NodeHostname=localhost NodeAddr=127.0.0.1 Port=`), with `%n` in their spool, pid and
log paths, `CPUs=` cores each (2: room for 2 tasks per node) and the host's memory;
both share the same cores and filesystem, so compare results between them, not speed.
Everything lives in DIR (config, keys, sockets, state, logs); nothing in /etc changes.
Clients find the cluster through SLURM_CONF. Daemons start with stdin from /dev/null
and their own log files, and are stopped by PID. Needs Debian's `slurmctld slurmd
slurm-client munge` (tests/clusters/install_slurm.sh) and root (slurmd runs jobs as their user).
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

TWO_NODES = ("n1", "n2")


class ClusterError(RuntimeError):
    pass


def free_port(addr: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((addr, 0))
        return s.getsockname()[1]


def _node_facts() -> tuple[str, int, int]:
    out = subprocess.run(["slurmd", "-C"], capture_output=True, text=True, check=True).stdout
    name = re.search(r"NodeName=(\S+)", out).group(1)
    cpus = int(re.search(r"CPUs=(\d+)", out).group(1))
    mem = int(re.search(r"RealMemory=(\d+)", out).group(1))
    return name, cpus, mem


def node_names(d: str) -> list[str]:
    """The nodes of the cluster in `d`, as its slurm.conf names them."""
    with open(os.path.join(d, "slurm.conf")) as f:
        return re.findall(r"^NodeName=(\S+)", f.read(), flags=re.M)


def _node_lines(nodes: int, cpus_per_node: int | None) -> tuple[list[str], str]:
    host, cpus, mem = _node_facts()
    if nodes == 1:
        return [f"NodeName={host} NodeAddr=127.0.0.1 CPUs={cpus_per_node or cpus} RealMemory={mem} "
                "State=UNKNOWN"], f"{host}(127.0.0.1)"
    if nodes != len(TWO_NODES):
        raise ClusterError(f"nodes={nodes}: the test cluster has 1 or {len(TWO_NODES)} nodes")
    lines = [f"NodeName={n} NodeHostname=localhost NodeAddr=127.0.0.1 Port={free_port()} "
             f"CPUs={cpus_per_node or 2} RealMemory={mem} State=UNKNOWN" for n in TWO_NODES]
    return lines, f"{host}(127.0.0.1)"


def write_config(d: str, nodes: int = 1, cpus_per_node: int | None = None,
                 layout: tuple[list[str], str] | None = None, extra: str = "") -> str:
    """DIR/slurm.conf; `layout` (node lines, SlurmctldHost value) replaces the loopback
    nodes (tests/clusters/testhosts.py: hosts in namespaces), `extra` adds settings."""
    node_lines, ctld = layout or _node_lines(nodes, cpus_per_node)
    names = [line.split()[0].split("=", 1)[1] for line in node_lines]
    for sub in ("munge", "state", "log", *(os.path.join("spool", n) for n in names)):
        os.makedirs(os.path.join(d, sub), exist_ok=True)
    os.chmod(os.path.join(d, "munge"), 0o755)  # munged's socket folder: world-enterable
    key = os.path.join(d, "munge.key")
    if not os.path.exists(key):
        with open(key, "wb") as f:
            f.write(os.urandom(1024))
    os.chmod(key, 0o400)
    # cred_expire=10 (Slurm's minimum is 5; default 120) and sched_interval=1 (default 60):
    # a requeued job is held cred_expire + 1 s and then waits for the next scheduling pass,
    # 2 to 3 minutes with the defaults against about 12 s here (the preemption tests)
    conf = f"""# written by tests/clusters/testcluster.py (random FirstJobId: runs/slurm-<id> never collide across clusters)
ClusterName=hvdtest
FirstJobId={random.randint(1_000_000, 60_000_000)}
SlurmctldHost={ctld}
SlurmctldPort={free_port()}
SlurmdPort={free_port()}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.socket.2,cred_expire=10
CryptoType=crypto/munge
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool/%n
SlurmctldPidFile={d}/slurmctld.pid
SlurmdPidFile={d}/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
MinJobAge=600
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
{extra}{chr(10).join(node_lines)}
PartitionName=debug Nodes={",".join(names)} Default=YES MaxTime=INFINITE State=UP
"""
    path = os.path.join(d, "slurm.conf")
    with open(path, "w") as f:
        f.write(conf)
    return path


def start_daemon(d: str, name: str, argv: list[str], env: dict | None = None) -> int:
    """Start `argv` in a session of its own (stdin /dev/null, output to DIR/log/NAME.stdout)
    and record its PID in DIR/NAME.daemon.pid, for `stop_daemons`."""
    os.makedirs(os.path.join(d, "log"), exist_ok=True)
    log = open(os.path.join(d, "log", f"{name}.stdout"), "ab")
    p = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, env=env,
                         start_new_session=True)
    with open(os.path.join(d, f"{name}.daemon.pid"), "w") as f:
        f.write(str(p.pid))
    return p.pid


def _wait(what: str, ok, timeout_s: float, d: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok():
            return
        time.sleep(0.3)
    logs = ""
    for f in sorted(os.listdir(os.path.join(d, "log"))):
        with open(os.path.join(d, "log", f), errors="replace") as fh:
            logs += f"\n--- {f} (tail)\n" + "".join(fh.readlines()[-15:])
    raise ClusterError(f"test cluster in {d}: {what} not ready after {timeout_s:.0f}s{logs}")


def env_for(d: str) -> dict:
    return {**os.environ, "SLURM_CONF": os.path.join(d, "slurm.conf")}


def up(d: str, nodes: int = 1, cpus_per_node: int | None = None) -> dict:
    """Start the cluster in folder `d` (1 or 2 nodes); returns the environment clients need."""
    for tool in ("munged", "slurmctld", "slurmd", "sbatch"):
        if shutil.which(tool) is None:
            raise ClusterError(f"{tool} not found: install Debian's slurmctld slurmd slurm-client munge "
                               "(tests/clusters/install_slurm.sh)")
    os.makedirs(d, exist_ok=True)
    conf = write_config(d, nodes, cpus_per_node)
    env = env_for(d)
    sock = os.path.join(d, "munge", "munge.socket.2")
    start_daemon(d, "munged", ["munged", "--foreground", "--force", f"--socket={sock}",
                         f"--key-file={d}/munge.key", f"--pid-file={d}/munged.pid",
                         f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge.seed"], env)
    _wait("munged", lambda: os.path.exists(sock), 20, d)
    start_daemon(d, "slurmctld", ["slurmctld", "-D", "-i", "-f", conf], env)
    _wait("slurmctld", lambda: subprocess.run(["scontrol", "ping"], env=env, capture_output=True,
                                              text=True).stdout.count("UP") > 0, 30, d)
    names = node_names(d)
    for n in names:
        start_daemon(d, _slurmd(n, names), ["slurmd", "-D", "-f", conf, "-N", n], env)

    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) in ("idle", "mixed") for n in names)
    _wait(f"node(s) {','.join(names)} idle in sinfo", idle, 60, d)
    return env


def _slurmd(node: str, names: list[str]) -> str:
    """The daemon's pid-file name: `slurmd` on one node, `slurmd-NODE` on several."""
    return "slurmd" if len(names) == 1 else f"slurmd-{node}"


def _daemons(d: str) -> list[str]:
    """Every daemon started in `d`, slurmd's first (munged last: the others need it to stop)."""
    slurmds = sorted(f[:-len(".daemon.pid")] for f in os.listdir(d) if f.startswith("slurmd")
                     and f.endswith(".daemon.pid"))
    return slurmds + ["slurmctld", "munged"]


def down(d: str, timeout_s: float = 20) -> list[str]:
    """Stop the cluster's daemons by PID (TERM, then KILL); returns the names that needed KILL."""
    return stop_daemons(d, _daemons(d) if os.path.isdir(d) else [], timeout_s)


def stop_daemons(d: str, names: list[str], timeout_s: float = 20, group: bool = False) -> list[str]:
    """Stop the daemons `start_daemon` recorded in `d` under `names`: SIGTERM, then SIGKILL
    after `timeout_s`; `group`: their whole session (sshd and its sessions). Returns the
    names that needed SIGKILL."""
    pids = {}
    for name in names:
        path = os.path.join(d, f"{name}.daemon.pid")
        if os.path.exists(path):
            pids[name] = int(open(path).read())
    send = os.killpg if group else os.kill
    for pid in pids.values():
        try:
            send(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    killed = []
    deadline = time.monotonic() + timeout_s
    for name, pid in pids.items():
        while time.monotonic() < deadline and _alive(pid):
            time.sleep(0.2)
        if _alive(pid):
            send(pid, signal.SIGKILL)
            killed.append(name)
        os.remove(os.path.join(d, f"{name}.daemon.pid"))
    return killed


def _alive(pid: int) -> bool:
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except OSError:
        return False


def parse_cli(argv: list[str], nodes: int | None) -> tuple[str, str, int | None] | None:
    """`up|down DIR [--nodes N]` (`--nodes` only where `nodes`, its default, is given):
    (command, absolute DIR, nodes), or None for anything else."""
    if nodes is not None and len(argv) == 4 and argv[2] == "--nodes" and argv[3].isdigit():
        nodes, argv = int(argv[3]), argv[:2]
    if len(argv) != 2 or argv[0] not in ("up", "down"):
        return None
    return argv[0], os.path.abspath(argv[1]), nodes


def cli(prog: str, doc: str, argv: list[str], up_line, down, errors: tuple, nodes: int | None = None,
        leftovers=None) -> int:
    """The test clusters' command line (this module, testnet, testhosts): `up DIR` prints
    `up_line(DIR, nodes)` (`up_line(DIR)` without --nodes), `down DIR` runs `down(DIR)`
    and fails naming what `leftovers(DIR)` still finds. 2: usage; 1: one of `errors`."""
    parsed = parse_cli(argv, nodes)
    if parsed is None:
        print(doc, file=sys.stderr)
        return 2
    cmd, d, n = parsed
    try:
        if cmd == "up":
            print(up_line(d) if nodes is None else up_line(d, n))
            return 0
        down(d)
        left = leftovers(d) if leftovers else []
    except errors as e:
        print(f"{prog}: {e}", file=sys.stderr)
        return 1
    if left:
        print(f"{prog}: left behind: {left}", file=sys.stderr)
        return 1
    return 0


def _up_line(d: str, nodes: int) -> str:
    up(d, nodes)
    return f"export SLURM_CONF={d}/slurm.conf"


def main(argv: list[str]) -> int:
    return cli("testcluster", __doc__, argv, _up_line, down, (ClusterError,), nodes=1)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
