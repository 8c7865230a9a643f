"""Names and ssh for the two-node test cluster (tests/clusters/testcluster.py), so that
horovodrun can start rank 1 "on n2" as it would on a real cluster: over ssh.

    python -m tests.clusters.testnet up DIR     # /etc/hosts: n1 -> 127.0.0.1, n2 -> 127.0.0.2; sshd on 127.0.0.2
    python -m tests.clusters.testnet down DIR

- Names: horovodrun resolves each `-H` host and starts the ranks of a host whose
  address is not one of this machine's interface addresses over ssh. `n1` resolves to
  127.0.0.1 (local: started directly, as on the batch node) and `n2` to 127.0.0.2 (on
  the loopback interface but not one of its listed addresses: remote). The lines are
  tagged with DIR and removed by `down`; no other line of /etc/hosts changes.
- ssh: Debian's OpenSSH `sshd` on 127.0.0.2 and a free port, with a host key and a
  client key made for the test (DIR/ssh/), root's login by key only. horovodrun is
  pointed at it with its own options (`ssh_args()`: --ssh-port, --ssh-identity-file).
  horovodrun's ssh line turns host-key checking off and would write the key into
  ~/.ssh/known_hosts; `DIR/bin/ssh` (put it first on PATH) adds a known-hosts file
  in DIR instead, so nothing in ~/.ssh changes.
Needs root (/etc/hosts, sshd as root) and `openssh-server` (tests/clusters/install_slurm.sh).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time

from tests.clusters import testcluster

HOSTS = "/etc/hosts"
ADDRS = {"n1": "127.0.0.1", "n2": "127.0.0.2"}
SSHD = "/usr/sbin/sshd"


class NetError(RuntimeError):
    pass


def _tag(d: str) -> str:
    return f"# hvdtrain-testnet {os.path.abspath(d)}"


def add_names(d: str) -> None:
    lines = [f"{addr} {name}  {_tag(d)}\n" for name, addr in ADDRS.items()]
    with open(HOSTS, "a") as f:  # in place: /etc/hosts may be a bind mount that cannot be replaced
        f.writelines(lines)


def remove_names(d: str) -> None:
    with open(HOSTS) as f:
        kept = [line for line in f if _tag(d) not in line]
    with open(HOSTS, "r+") as f:
        f.writelines(kept)
        f.truncate()


def _keys(ssh: str) -> None:
    os.makedirs(ssh, mode=0o700, exist_ok=True)
    for name in ("host_key", "id_ed25519"):
        if not os.path.exists(os.path.join(ssh, name)):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "hvdtrain-testnet",
                            "-f", os.path.join(ssh, name)], check=True)
    shutil.copy(os.path.join(ssh, "id_ed25519.pub"), os.path.join(ssh, "authorized_keys"))


def _write_wrapper(d: str) -> None:
    os.makedirs(os.path.join(d, "bin"), exist_ok=True)
    path = os.path.join(d, "bin", "ssh")
    with open(path, "w") as f:
        f.write("#!/bin/sh\n# the test cluster's ssh: known hosts in the test folder, not ~/.ssh\n"
                f"exec /usr/bin/ssh -o UserKnownHostsFile={d}/ssh/known_hosts -o LogLevel=ERROR \"$@\"\n")
    os.chmod(path, 0o755)


def sshd_argv(ssh: str, addr: str, port: int, name: str) -> list[str]:
    """sshd on `addr:port` with the test's keys (root by key only); config, pid file and
    log are DIR/ssh/NAME{_config,.pid,.log}."""
    conf = os.path.join(ssh, f"{name}_config")
    with open(conf, "w") as f:
        f.write(f"ListenAddress {addr}\nPort {port}\nHostKey {ssh}/host_key\nPidFile {ssh}/{name}.pid\n"
                f"AuthorizedKeysFile {ssh}/authorized_keys\nPermitRootLogin prohibit-password\n"
                "PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\nStrictModes no\n"
                "PrintMotd no\nAcceptEnv none\n")
    os.makedirs("/run/sshd", exist_ok=True)  # sshd's privilege-separation folder
    return [SSHD, "-D", "-f", conf, "-E", os.path.join(ssh, f"{name}.log")]


def up(d: str) -> dict:
    """Names, keys and sshd; returns {"port", "identity", "path"} for the tests."""
    d = os.path.abspath(d)
    if not os.path.exists(SSHD) or shutil.which("ssh") is None:
        raise NetError(f"{SSHD} or ssh not found: install Debian's openssh-server openssh-client "
                       "(tests/clusters/install_slurm.sh)")
    ssh = os.path.join(d, "ssh")
    _keys(ssh)
    _write_wrapper(d)
    port = testcluster.free_port(ADDRS["n2"])
    testcluster.start_daemon(d, "sshd", sshd_argv(ssh, ADDRS["n2"], port, "sshd"))
    add_names(d)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        r = subprocess.run([os.path.join(d, "bin", "ssh"), "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=no",
                            "-p", str(port), "-i", f"{ssh}/id_ed25519", "n2", "true"], capture_output=True, text=True)
        if r.returncode == 0:
            return {"port": port, "identity": f"{ssh}/id_ed25519", "path": os.path.join(d, "bin")}
        time.sleep(0.3)
    down(d)
    raise NetError(f"ssh to n2 (127.0.0.2:{port}) did not work after 20s: {r.stderr.strip()} "
                   f"(sshd log: {ssh}/sshd.log)")


def ssh_args(net: dict) -> str:
    """horovodrun's own ssh options for the test sshd (for HOROVODRUN_ARGS)."""
    return f"--ssh-port {net['port']} --ssh-identity-file {net['identity']}"


def down(d: str, timeout_s: float = 10) -> bool:
    """Remove the names, stop sshd by PID; True if it needed SIGKILL."""
    d = os.path.abspath(d)
    remove_names(d)
    return bool(testcluster.stop_daemons(d, ["sshd"], timeout_s, group=True))  # sshd and its sessions


def _up_line(d: str) -> str:
    net = up(d)
    return f"export PATH={net['path']}:$PATH HOROVODRUN_ARGS='{ssh_args(net)}'"


def main(argv: list[str]) -> int:
    return testcluster.cli("testnet", __doc__, argv, _up_line, down, (NetError,))


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
