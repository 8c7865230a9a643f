"""Test hosts with their own network: a Slurm cluster whose nodes are network namespaces
on this machine, for the fault tests (tests/slurm/test_hosts.py).

    python -m tests.clusters.testhosts up DIR [--nodes 3]   # prints the PATH and SLURM_CONF to use
    python -m tests.clusters.testhosts down DIR             # removes everything, also after a failure

The loopback cluster (tests/clusters/testcluster.py, tests/clusters/testnet.py) shares one network stack:
a "lost node" there is a killed process whose sockets close at once. Here each node is a
host of its own as far as the network goes, so a node can vanish without a reset:
- one namespace per node (`hvd<tag>-h1` ...) with one interface, `eth0` (the same name on
  every node, as horovodrun's interface check wants), its own address and host name (a UTS
  namespace per daemon: `hostname` in a job says h1), `lo`, and no default route;
- a namespace of the test's own (`hvd<tag>-net`) holding the bridge that joins the veth
  pairs, with slurmctld on the bridge's address;
- slurmd and sshd started in each node's namespace (`NodeAddr=`, sshd on the node's address,
  port 22, the test's keys: tests/clusters/testnet.py); munged in this namespace (its Unix socket
  is a file, seen from every namespace), like the files;
- names in /etc/hosts (h1 -> 10.x.y.11 ..., hvd<tag>-ctl -> 10.x.y.1), tagged with DIR and removed by `down`;
- DIR/bin: `sbatch`, `squeue`, `scontrol`, `scancel`, `sinfo` that run in the net namespace
  when called from outside the test's namespaces (so the test's clients reach slurmctld and
  no route is added to this machine), and the test's `ssh` (known hosts in DIR).
The /24 is chosen at random among 10.200-250.x.0 and refused if any route or address of
this machine's namespace overlaps it. `cut(d, node)` is a power loss: the bridge side of the
node's link goes down (no packet in or out, nothing sends a reset) and every process in the
node's namespace is SIGKILLed; `revive(d, node)` brings it back. `leftovers(d)` lists what
`down` failed to remove. Needs root and iproute2 (`ip netns`).
"""
from __future__ import annotations

import ipaddress
import json
import os
import random
import re
import signal
import subprocess
import sys

from tests.clusters import testcluster, testnet

NODES = ("h1", "h2", "h3")
CLIENTS = ("sbatch", "squeue", "scontrol", "scancel", "sinfo")
SSH_PORT = 22
# the test cluster's Slurm timers: a node that stops answering is DOWN after SlurmdTimeout
# (slurmctld pings every third of it), and its jobs end NODE_FAIL (requeued with --requeue)
SLURMD_TIMEOUT_S = 15
MESSAGE_TIMEOUT_S = 5


class HostsError(RuntimeError):
    pass


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if check and r.returncode != 0:
        raise HostsError(f"ip {' '.join(args)}: {r.stderr.strip()}")
    return r


def capable() -> str | None:
    """None where namespaces can be made here, else why not (for a skip's reason)."""
    if os.geteuid() != 0:
        return "network namespaces need root"
    probe = f"hvdprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"`ip netns add` fails here: {r.stderr.strip()}"
    subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


def networks_in_use() -> list[ipaddress.IPv4Network]:
    """Every IPv4 route (all tables) and address of this namespace, as networks."""
    out = ip("-4", "-o", "route", "show", "table", "all").stdout + ip("-4", "-o", "addr").stdout
    nets = []
    for tok in re.findall(r"(?:^|\s)(default|\d+\.\d+\.\d+\.\d+(?:/\d+)?)", out):
        nets.append(ipaddress.ip_network("0.0.0.0/0" if tok == "default" else tok, strict=False))
    return nets


def choose_subnet(rng: random.Random | None = None) -> ipaddress.IPv4Network:
    """A /24 in 10.200-250.x that no route or address of this machine covers or lies in
    (a default route covers everything, so it is not counted: it is where packets would
    go if the test's namespaces had a route out, and they have none)."""
    rng = rng or random.Random()
    used = [n for n in networks_in_use() if n.prefixlen > 0]
    for _ in range(200):
        net = ipaddress.ip_network(f"10.{rng.randint(200, 250)}.{rng.randint(0, 255)}.0/24")
        if not any(net.overlaps(u) for u in used):
            return net
    raise HostsError(f"no free /24 in 10.200-250.x: routes and addresses here cover them all ({used[:5]}...)")


def _state(d: str) -> dict:
    path = os.path.join(d, "testhosts.json")
    return json.load(open(path)) if os.path.exists(path) else {}


def _in_ns(ns: str, hostname: str | None, argv: list[str]) -> list[str]:
    """argv run in namespace `ns`, with a host name of its own (a UTS namespace) if given;
    every step execs, so the PID is the daemon's. nsenter, not `ip netns exec`: that one
    mounts a sysfs of the namespace's own over /sys, which hides /sys/fs/cgroup from slurmd."""
    enter = ["nsenter", f"--net=/run/netns/{ns}", "--"]
    if hostname is None:
        return [*enter, *argv]
    return [*enter, "unshare", "--uts", "sh", "-c", 'hostname "$0" && exec "$@"', hostname, *argv]


def _make_net(st: dict) -> None:
    net, br = st["net_ns"], st["subnet"]
    ip("netns", "add", net)
    ip("-n", net, "link", "set", "lo", "up")
    ip("-n", net, "link", "add", "br0", "type", "bridge")
    ip("-n", net, "addr", "add", f"{st['ctld_addr']}/{br.split('/')[1]}", "dev", "br0")
    ip("-n", net, "link", "set", "br0", "up")
    for node, addr in st["addrs"].items():
        ns = st["ns"][node]
        ip("netns", "add", ns)
        ip("link", "add", f"v-{node}", "netns", net, "type", "veth", "peer", "name", "eth0", "netns", ns)
        ip("-n", net, "link", "set", f"v-{node}", "master", "br0", "up")
        ip("-n", ns, "addr", "add", f"{addr}/{br.split('/')[1]}", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")
        ip("-n", ns, "link", "set", "lo", "up")


def _write_clients(d: str, net_ns: str) -> None:
    """DIR/bin/<client>: into the net namespace from outside the test's namespaces; inside
    one (a job's `scontrol requeue` on h1) it runs where it is, over the node's own link."""
    os.makedirs(os.path.join(d, "bin"), exist_ok=True)
    for c in CLIENTS:
        path = os.path.join(d, "bin", c)
        with open(path, "w") as f:
            f.write(f"#!/bin/sh\n# tests/clusters/testhosts.py: the test cluster's {c}\n"
                    f'[ -z "$(ip netns identify 2>/dev/null)" ] && exec nsenter --net=/run/netns/{net_ns} -- /usr/bin/{c} "$@"\n'
                    f'exec /usr/bin/{c} "$@"\n')
        os.chmod(path, 0o755)


def _hosts_lines(d: str, st: dict) -> None:
    taken = [ln for ln in open(testnet.HOSTS) if re.search(rf"\s({'|'.join(st['addrs'])})(\s|$)", ln)
             and not ln.lstrip().startswith("#")]
    if taken:
        raise HostsError(f"{testnet.HOSTS} already names {', '.join(st['addrs'])} (another test cluster is up?): "
                         f"{taken[0].strip()}")
    names = {**st["addrs"], st["ctld"]: st["ctld_addr"]}  # slurmctld binds to its host name's address
    with open(testnet.HOSTS, "a") as f:  # in place: /etc/hosts may be a bind mount
        f.writelines(f"{a} {n}  {testnet._tag(d)}\n" for n, a in names.items())


def start_node(d: str, node: str) -> None:
    """slurmd and sshd in `node`'s namespace, under its host name."""
    st = _state(d)
    ns, conf = st["ns"][node], os.path.join(d, "slurm.conf")
    env = testcluster.env_for(d)
    testcluster.start_daemon(d, f"slurmd-{node}", _in_ns(ns, node, ["slurmd", "-D", "-f", conf, "-N", node]), env)
    testcluster.start_daemon(d, f"sshd-{node}", _in_ns(ns, node, testnet.sshd_argv(
        os.path.join(d, "ssh"), st["addrs"][node], SSH_PORT, f"sshd-{node}")))


def up(d: str, nodes: int = 3, cpus_per_node: int = 2) -> dict:
    """Namespaces, bridge, names, munged, slurmctld, slurmd + sshd per node; returns
    {"env": client environment, "dir", "nodes": {name: addr}, "ssh": for HOROVODRUN_ARGS}.
    Anything that fails on the way removes what was made."""
    d = os.path.abspath(d)
    if not 1 <= nodes <= len(NODES):
        raise HostsError(f"nodes={nodes}: 1 to {len(NODES)}")
    os.makedirs(d, exist_ok=True)
    tag = f"{random.randrange(16 ** 5):05x}"
    subnet = choose_subnet()
    hosts = list(subnet.hosts())
    names = NODES[:nodes]
    st = {"tag": tag, "subnet": str(subnet), "net_ns": f"hvd{tag}-net", "ctld": f"hvd{tag}-ctl", "ctld_addr": str(hosts[0]),
          "ns": {n: f"hvd{tag}-{n}" for n in names}, "addrs": {n: str(hosts[10 + i]) for i, n in enumerate(names)}}
    with open(os.path.join(d, "testhosts.json"), "w") as f:
        json.dump(st, f)
    try:
        return _up(d, st, cpus_per_node)
    except BaseException:
        down(d)
        raise


def _up(d: str, st: dict, cpus_per_node: int) -> dict:
    _make_net(st)
    _hosts_lines(d, st)
    _write_clients(d, st["net_ns"])
    testnet._keys(os.path.join(d, "ssh"))
    testnet._write_wrapper(d)
    _, _, mem = testcluster._node_facts()
    lines = [f"NodeName={n} NodeHostname={n} NodeAddr={a} CPUs={cpus_per_node} RealMemory={mem} State=UNKNOWN"
             for n, a in st["addrs"].items()]
    conf = testcluster.write_config(d, layout=(lines, f"{st['ctld']}({st['ctld_addr']})"),
                                    extra=f"SlurmdTimeout={SLURMD_TIMEOUT_S}\nMessageTimeout={MESSAGE_TIMEOUT_S}\n")
    env = {**testcluster.env_for(d), "PATH": f"{d}/bin:{os.environ['PATH']}"}
    sock = os.path.join(d, "munge", "munge.socket.2")
    testcluster.start_daemon(d, "munged", ["munged", "--foreground", "--force", f"--socket={sock}",
                                           f"--key-file={d}/munge.key", f"--pid-file={d}/munged.pid",
                                           f"--log-file={d}/log/munged.log", f"--seed-file={d}/munge.seed"], env)
    testcluster._wait("munged", lambda: os.path.exists(sock), 20, d)
    testcluster.start_daemon(d, "slurmctld", _in_ns(st["net_ns"], st["ctld"], ["slurmctld", "-D", "-i", "-f", conf]), env)
    testcluster._wait("slurmctld", lambda: "UP" in subprocess.run(["scontrol", "ping"], env=env, capture_output=True,
                                                                  text=True).stdout, 30, d)
    for n in st["addrs"]:
        start_node(d, n)
    wait_idle(d, env, list(st["addrs"]))
    return {"env": env, "dir": d, "nodes": dict(st["addrs"]),
            "ssh": {"port": SSH_PORT, "identity": f"{d}/ssh/id_ed25519", "path": os.path.join(d, "bin")}}


def wait_idle(d: str, env: dict, names: list[str], timeout_s: float = 60) -> None:
    def idle() -> bool:
        out = subprocess.run(["sinfo", "-h", "-N", "-o", "%N %T"], env=env, capture_output=True, text=True).stdout
        states = dict(line.split() for line in out.splitlines() if line.strip())
        return all(states.get(n) in ("idle", "mixed") for n in names)
    testcluster._wait(f"node(s) {','.join(names)} idle in sinfo", idle, timeout_s, d)


def node_state(env: dict, node: str) -> str:
    """sinfo's state of `node` ("idle", "down*", ...), "" if sinfo does not answer."""
    return subprocess.run(["sinfo", "-h", "-n", node, "-o", "%T"], env=env, capture_output=True,
                          text=True).stdout.strip()


def ns_pids(ns: str) -> list[int]:
    r = subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True)
    return [int(p) for p in r.stdout.split()]


def cut(d: str, node: str) -> None:
    """Power loss of `node`: its link goes down on the bridge side (nothing in or out, no
    reset sent to anyone), then every process in its namespace is SIGKILLed (slurmd, the
    job's slurmstepd and ranks, sshd and its sessions). What its peers had in flight to it
    is simply never answered."""
    st = _state(d)
    ip("-n", st["net_ns"], "link", "set", f"v-{node}", "down")
    for pid in ns_pids(st["ns"][node]):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def revive(d: str, node: str, env: dict) -> None:
    """The node comes back: link up, slurmd and sshd started again; Slurm returns it to
    service when it registers (ReturnToService=2)."""
    st = _state(d)
    testcluster.stop_daemons(d, [f"slurmd-{node}", f"sshd-{node}"], timeout_s=5)  # dead: forget their PIDs
    ip("-n", st["net_ns"], "link", "set", f"v-{node}", "up")
    start_node(d, node)
    wait_idle(d, env, [node], timeout_s=90)


def down(d: str, timeout_s: float = 20) -> list[str]:
    """Stop every daemon by PID, SIGKILL what is left in the test's namespaces (a job's
    processes), delete the namespaces (their links and bridge go with them) and the
    /etc/hosts lines. Returns the daemons that needed SIGKILL."""
    d = os.path.abspath(d)
    st = _state(d)
    killed = []
    if os.path.isdir(d):
        names = sorted(f[:-len(".daemon.pid")] for f in os.listdir(d) if f.endswith(".daemon.pid"))
        order = [n for n in names if n.startswith(("slurmd", "sshd"))] + [n for n in ("slurmctld", "munged")
                                                                         if n in names]
        killed = testcluster.stop_daemons(d, order, timeout_s, group=False)
    for ns in [*st.get("ns", {}).values(), st.get("net_ns")]:
        if ns and os.path.exists(f"/run/netns/{ns}"):
            for pid in ns_pids(ns):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            ip("netns", "del", ns, check=False)
    testnet.remove_names(d)
    return killed


def leftovers(d: str) -> list[str]:
    """What `down` should have removed and did not: namespaces, /etc/hosts lines,
    processes whose command line names DIR."""
    d = os.path.abspath(d)
    st, left = _state(d), []
    if st:
        listed = ip("netns", "list").stdout
        left += [f"namespace {ns}" for ns in [*st["ns"].values(), st["net_ns"]] if re.search(rf"^{ns}\b", listed, re.M)]
    left += [f"{testnet.HOSTS}: {ln.strip()}" for ln in open(testnet.HOSTS) if testnet._tag(d) in ln]
    left += [f"process {p}" for p in subprocess.run(["pgrep", "-f", d], capture_output=True, text=True).stdout.split()
             if int(p) != os.getpid()]
    return left


def _up_line(d: str, nodes: int) -> str:
    up(d, nodes)
    return (f"export PATH={d}/bin:$PATH SLURM_CONF={d}/slurm.conf "
            f"HOROVODRUN_ARGS='--ssh-port {SSH_PORT} --ssh-identity-file {d}/ssh/id_ed25519'")


def main(argv: list[str]) -> int:
    return testcluster.cli("testhosts", __doc__, argv, _up_line, down, (HostsError, testcluster.ClusterError),
                           nodes=3, leftovers=leftovers)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
