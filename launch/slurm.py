"""Turn a Slurm allocation into a Horovod launch.

    python -m launch.slurm command hvdtrain.sanity --preset ci     # print the launch command
    python -m launch.slurm hosts                                    # host1:2,host2:2
    python -m launch.slurm task CMD...                              # srun mode: one rank per task
    python -m launch.slurm discover                                 # elastic: the job's nodes that answer

`launch/slurm_run.sh` (the body of every launch/*.sbatch) calls this. Two launchers:

- `horovodrun` (default): `horovodrun -np $SLURM_NTASKS -H host1:k1,host2:k2 python -m MODULE`
  from the batch step; horovodrun starts the ranks, over ssh on the other nodes: those need
  passwordless ssh from the first node and node names that resolve. HOROVODRUN_ARGS adds
  horovodrun options (`--ssh-port 2222 --ssh-identity-file ~/.ssh/id_cluster`,
  `--network-interfaces ib0`).
- `srun` (`LAUNCHER=srun`): each Slurm task is one Horovod rank. The batch step starts
  Horovod's Gloo rendezvous server (`rendezvous`), then `srun python -m launch.slurm task
  ...` sets HOROVOD_RANK/SIZE/LOCAL_RANK/... from SLURM_PROCID/NTASKS/LOCALID and the
  node list, points HOROVOD_GLOO_RENDEZVOUS_ADDR/PORT at the server, and execs the command.

Elastic (`--elastic` among the module's arguments, horovodrun only): `horovodrun --gloo -np N
--min-np M --max-np N --host-discovery-script "python -m launch.slurm discover"
--blacklist-cooldown-range LO HI`, where `discover` prints the job's nodes as Slurm holds
them now (`scontrol show job`: a `--no-kill` job loses a node Slurm marks DOWN) that accept
a TCP connection on the ssh port within a second, each with its slots. M is ELASTIC_MIN_NP
(default: the first node's slots), LO HI is ELASTIC_COOLDOWN (default "10 300": how long
Horovod keeps a failed node out before it may come back). docs/reliability.md says what a
lost node needs to be noticed at all (ssh keepalives, a Gloo timeout) and what Slurm allows.

Nodelists use Slurm's hostlist syntax (`node[01-03,07],gpu5`); tasks per node use
SLURM_TASKS_PER_NODE's syntax (`2(x3),1`).
"""
from __future__ import annotations

import os
import re
import shlex
import socket
import sys

_RANGE = re.compile(r"^(\d+)(?:-(\d+))?$")


class SlurmEnvError(ValueError):
    """The Slurm environment is missing or inconsistent; the message says which variable."""


def _split_top(text: str) -> list[str]:
    """Split on commas that are not inside brackets."""
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "[":
            depth += 1
        elif ch == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"unbalanced ']' in nodelist {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    if depth != 0:
        raise SlurmEnvError(f"unbalanced '[' in nodelist {text!r}")
    parts.append(cur)
    return [p for p in parts if p]


def _expand_one(item: str) -> list[str]:
    m = re.search(r"\[([^\[\]]*)\]", item)
    if not m:
        return [item]
    head, tail = item[:m.start()], item[m.end():]
    names = []
    for piece in m.group(1).split(","):
        r = _RANGE.match(piece.strip())
        if not r:
            raise SlurmEnvError(f"bad range {piece!r} in nodelist item {item!r}")
        lo, hi = r.group(1), r.group(2) or r.group(1)
        if int(hi) < int(lo):
            raise SlurmEnvError(f"descending range {piece!r} in nodelist item {item!r}")
        width = len(lo)
        names += [f"{head}{str(i).zfill(width)}" for i in range(int(lo), int(hi) + 1)]
    return [n for name in names for n in _expand_one(name + tail)]


def expand_nodelist(nodelist: str) -> list[str]:
    """`node[01-03,07],gpu5` -> [node01, node02, node03, node07, gpu5] (as `scontrol show
    hostnames` prints them; several bracket groups in one name expand as a product)."""
    out = [n for item in _split_top(nodelist.strip()) for n in _expand_one(item)]
    if not out:
        raise SlurmEnvError(f"empty nodelist {nodelist!r}")
    return out


def expand_tasks_per_node(spec: str) -> list[int]:
    """`2(x3),1` -> [2, 2, 2, 1]."""
    out = []
    for part in spec.split(","):
        m = re.fullmatch(r"\s*(\d+)(?:\(x(\d+)\))?\s*", part)
        if not m:
            raise SlurmEnvError(f"bad SLURM_TASKS_PER_NODE item {part!r} in {spec!r}")
        out += [int(m.group(1))] * int(m.group(2) or 1)
    return out


def allocation(env: dict[str, str] | None = None) -> list[tuple[str, int]]:
    """[(host, slots)] for this job: SLURM_JOB_NODELIST with SLURM_TASKS_PER_NODE
    (or SLURM_NTASKS_PER_NODE, the same for every node)."""
    env = dict(os.environ if env is None else env)
    nodelist = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
    if not nodelist:
        raise SlurmEnvError("SLURM_JOB_NODELIST is not set: not inside a Slurm job (use launch/local.sh)")
    hosts = expand_nodelist(nodelist)
    if env.get("SLURM_TASKS_PER_NODE"):
        slots = expand_tasks_per_node(env["SLURM_TASKS_PER_NODE"])
    elif env.get("SLURM_NTASKS_PER_NODE"):
        slots = [int(env["SLURM_NTASKS_PER_NODE"])] * len(hosts)
    else:
        raise SlurmEnvError("neither SLURM_TASKS_PER_NODE nor SLURM_NTASKS_PER_NODE is set")
    if len(slots) != len(hosts):
        raise SlurmEnvError(f"{len(hosts)} nodes in {nodelist!r} but {len(slots)} task counts "
                            f"in {env.get('SLURM_TASKS_PER_NODE')!r}")
    ntasks = env.get("SLURM_NTASKS")
    if ntasks and int(ntasks) != sum(slots):
        raise SlurmEnvError(f"SLURM_NTASKS={ntasks} but the nodes' task counts sum to {sum(slots)}")
    return list(zip(hosts, slots))


def horovod_hosts(alloc: list[tuple[str, int]]) -> str:
    return ",".join(f"{h}:{k}" for h, k in alloc)


def horovodrun_command(alloc, python: str, module: str, args: list[str], horovodrun: str = "horovodrun",
                       extra: str = "") -> list[str]:
    # --gloo: hvdtrain's Horovod is built with Gloo (install/horovod.sh); without it
    # horovodrun first imports torch in a child process to ask whether MPI is built (~3 s)
    return [horovodrun, "--gloo", *shlex.split(extra), "-np", str(sum(k for _, k in alloc)), "-H", horovod_hosts(alloc),
            python, "-m", module, *args]


def is_elastic(args: list[str]) -> bool:
    """`--elastic` (or --train.elastic=true) among a module's arguments."""
    return any(a == "--elastic" or a.lower() in ("--train.elastic=true", "--train.elastic=1") for a in args)


def elastic_command(alloc, python: str, module: str, args: list[str], horovodrun: str = "horovodrun",
                    extra: str = "", min_np: int | None = None, cooldown: str = "10 300",
                    mark: str | None = None) -> list[str]:
    """horovodrun's elastic driver over the allocation: it starts the ranks on the hosts
    `discover` names, and re-plans when one is lost or comes back (after the cooldown).
    `mark`: a file `discover` creates on its first call (see `discover`)."""
    n = sum(k for _, k in alloc)
    min_np = alloc[0][1] if min_np is None else min_np
    if not 1 <= min_np <= n:
        raise SlurmEnvError(f"ELASTIC_MIN_NP={min_np}: 1 to the job's {n} tasks")
    lo_hi = cooldown.split()
    if len(lo_hi) != 2 or not all(x.isdigit() for x in lo_hi):
        raise SlurmEnvError(f"ELASTIC_COOLDOWN={cooldown!r}: two whole seconds, 'LOW HIGH'")
    return [horovodrun, "--gloo", *shlex.split(extra), "-np", str(n), "--min-np", str(min_np), "--max-np", str(n),
            "--host-discovery-script", f"{shlex.quote(python)} -m launch.slurm discover"
                                       + (f" {shlex.quote(mark)}" if mark else ""),
            "--blacklist-cooldown-range", *lo_hi, python, "-m", module, *args]


def ssh_port(extra: str) -> int:
    """The port horovodrun's ssh uses: --ssh-port in HOROVODRUN_ARGS, else 22."""
    words = shlex.split(extra)
    for i, w in enumerate(words):
        if w == "--ssh-port" and i + 1 < len(words):
            return int(words[i + 1])
        if w.startswith("--ssh-port="):
            return int(w.split("=", 1)[1])
    return 22


def job_nodes(env: dict[str, str]) -> list[str]:
    """The job's nodes as slurmctld holds them now (a --no-kill job loses a node that goes
    DOWN); SlurmEnvError if scontrol does not answer."""
    import subprocess

    job = env.get("SLURM_JOB_ID")
    if not job:
        raise SlurmEnvError("SLURM_JOB_ID is not set: not inside a Slurm job")
    r = subprocess.run(["scontrol", "show", "job", "-o", job], capture_output=True, text=True, timeout=10)
    m = re.search(r"(?:^|\s)NodeList=(\S+)", r.stdout)
    if r.returncode != 0 or not m:
        raise SlurmEnvError(f"scontrol show job {job}: {(r.stderr or r.stdout).strip()[:200]}")
    return expand_nodelist(m.group(1))


def answers(host: str, port: int, timeout_s: float) -> bool:
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
        return True
    except OSError:
        return False


def discover(env: dict[str, str], timeout_s: float = 1.0, mark: str | None = None,
             here: str | None = None) -> list[tuple[str, int]]:
    """[(host, slots)]: the job's nodes now that accept a connection on the ssh port within
    `timeout_s` (probed at once), with the slots they had when the job began.

    `mark` (a file that does not exist yet): the first call names only this node (the
    batch host, where horovodrun's driver runs) and creates it. Horovod orders the hosts it
    sees first as a set (horovod/runner/elastic/discovery.py:242 and 219-222) and keeps
    that order, so rank 0, its coordinator, could start on another node; when that node is
    lost, the driver's discovery thread notifies rank 0 there while holding the lock that
    re-planning needs (driver.py:191-206, 226-233), over a connect() without a timeout
    (horovod/runner/common/util/network.py:266-275), and the ranks left wait at the
    rendezvous for minutes. Named alone first, this node gets rank 0 (the job ends with
    it anyway: the driver runs there)."""
    from concurrent.futures import ThreadPoolExecutor

    slots = dict(allocation(env))
    here = here or env.get("SLURMD_NODENAME") or socket.gethostname()
    if mark and not os.path.exists(mark) and here in slots:
        os.makedirs(os.path.dirname(os.path.abspath(mark)), exist_ok=True)
        open(mark, "w").close()
        return [(here, slots[here])]
    nodes = [n for n in job_nodes(env) if n in slots]
    port = ssh_port(env.get("HOROVODRUN_ARGS", ""))
    with ThreadPoolExecutor(max(1, len(nodes))) as pool:
        up = list(pool.map(lambda n: answers(n, port, timeout_s), nodes))
    return [(n, slots[n]) for n, ok in zip(nodes, up) if ok]


def ssh_keepalive_s(host: str, extra: str = "", env: dict[str, str] | None = None) -> int:
    """ServerAliveInterval (seconds, 0 = off) of the ssh that horovodrun would run to
    `host`: `ssh -G` prints the options it would use (~/.ssh/config, /etc/ssh/ssh_config,
    the `ssh` first on PATH) without connecting."""
    import subprocess

    r = subprocess.run(["ssh", "-G", "-p", str(ssh_port(extra)), host], capture_output=True, text=True, timeout=10,
                       env=env)
    m = re.search(r"^serveraliveinterval (\d+)$", r.stdout, re.M)
    return int(m.group(1)) if m else 0


def check_elastic_ssh(alloc, extra: str = "", here: str | None = None, env: dict[str, str] | None = None) -> None:
    """Refuse an elastic job whose ranks on other nodes run under an ssh without
    keepalives: horovodrun's ssh line sets none (horovod/runner/util/remote.py:18), and
    its elastic driver counts a host as failed only when that ssh exits
    (horovod/runner/elastic/driver.py:294-297 -> registration.py:157-160). A node that
    loses power sends no reset, so the ssh never exits, the driver's barrier
    (registration.py:58, no timeout) waits for it, and so do the survivors."""
    here = here or os.environ.get("SLURMD_NODENAME") or socket.gethostname()
    for host, _ in alloc:
        if host != here and ssh_keepalive_s(host, extra, env) <= 0:
            raise SlurmEnvError(
                f"--elastic across nodes needs ssh keepalives, and `ssh -G {host}` says serveraliveinterval 0. "
                f"horovodrun starts the ranks on other nodes under ssh without ServerAliveInterval "
                f"(horovod/runner/util/remote.py:18), and its elastic driver learns that a node is lost only when "
                f"that ssh exits: a node that loses power or its link sends no reset, its ssh never exits, and the "
                f"driver and the ranks left wait for it for ever instead of going on without it "
                f"(docs/reliability.md, elastic across nodes). Set `ServerAliveInterval 5` and "
                f"`ServerAliveCountMax 3` for the nodes in ~/.ssh/config (or /etc/ssh/ssh_config)")


def srun_command(alloc, python: str, module: str, args: list[str]) -> list[str]:
    return ["srun", f"--ntasks={sum(k for _, k in alloc)}", "--kill-on-bad-exit=1",
            python, "-m", "launch.slurm", "task", "--", python, "-m", module, *args]


def task_env(env: dict[str, str], alloc: list[tuple[str, int]], addr: str, port: int) -> dict[str, str]:
    """Horovod's Gloo variables for the Slurm task described by `env` (srun mode)."""
    rank, local = int(env["SLURM_PROCID"]), int(env["SLURM_LOCALID"])
    node = int(env.get("SLURM_NODEID", 0))
    host, local_size = alloc[node]
    # cross rank: index among the nodes that have a task with this local rank
    peers = [i for i, (_, k) in enumerate(alloc) if k > local]
    out = {"HOROVOD_RANK": str(rank), "HOROVOD_SIZE": str(sum(k for _, k in alloc)),
           "HOROVOD_LOCAL_RANK": str(local), "HOROVOD_LOCAL_SIZE": str(local_size),
           "HOROVOD_CROSS_RANK": str(peers.index(node)), "HOROVOD_CROSS_SIZE": str(len(peers)),
           "HOROVOD_HOSTNAME": host, "HOROVOD_GLOO_RENDEZVOUS_ADDR": addr,
           "HOROVOD_GLOO_RENDEZVOUS_PORT": str(port), "HOROVOD_CONTROLLER": "gloo",
           "HOROVOD_CPU_OPERATIONS": "gloo"}
    if "CUDA_VISIBLE_DEVICES" not in env and env.get("HVDTRAIN_BIND_GPU", "1") == "1" and gpu_count() > 0:
        out["CUDA_VISIBLE_DEVICES"] = str(local)  # one rank per GPU
    return out


def gpu_count() -> int:
    try:
        return len([d for d in os.listdir("/dev") if re.fullmatch(r"nvidia\d+", d)])
    except OSError:
        return 0


def main(argv: list[str]) -> int:
    if not argv:
        print(__doc__)
        return 2
    cmd, rest = argv[0], argv[1:]
    try:
        if cmd == "hosts":
            print(horovod_hosts(allocation()))
        elif cmd == "hostnames":
            print("\n".join(expand_nodelist(rest[0])))
        elif cmd == "command":
            launcher = os.environ.get("LAUNCHER", "horovodrun")
            python = os.environ.get("HVDTRAIN_PYTHON", sys.executable)
            alloc = allocation()
            elastic = is_elastic(rest[1:])
            if launcher == "horovodrun":
                hvdrun = os.path.join(os.path.dirname(python), "horovodrun")
                hvdrun = hvdrun if os.path.exists(hvdrun) else "horovodrun"
                extra = os.environ.get("HOROVODRUN_ARGS", "")
                if elastic:
                    check_elastic_ssh(alloc, extra)
                    min_np = os.environ.get("ELASTIC_MIN_NP", "")
                    run_dir = next((a.split("=", 1)[1] for a in rest[1:] if a.startswith("--run.dir=")), None)
                    tag = f"{os.environ.get('SLURM_JOB_ID', 'nojob')}.{os.environ.get('SLURM_RESTART_COUNT', '0')}"
                    line = elastic_command(alloc, python, rest[0], rest[1:], hvdrun, extra,
                                           int(min_np) if min_np.isdigit() else None,
                                           os.environ.get("ELASTIC_COOLDOWN", "10 300"),
                                           os.path.join(run_dir, f".discovered-{tag}") if run_dir else None)
                else:
                    line = horovodrun_command(alloc, python, rest[0], rest[1:], hvdrun, extra)
            elif launcher == "srun" and elastic:
                raise SlurmEnvError("--elastic needs LAUNCHER=horovodrun: Horovod elastic's driver (horovodrun) "
                                    "starts, ends and re-plans the ranks; srun starts a fixed set of tasks")
            elif launcher == "srun":
                line = srun_command(alloc, python, rest[0], rest[1:])
            else:
                raise SlurmEnvError(f"LAUNCHER must be horovodrun or srun, not {launcher!r}")
            print(shlex.join(line))
        elif cmd == "discover":
            print("\n".join(f"{h}:{k}" for h, k in discover(dict(os.environ), mark=rest[0] if rest else None)))
        elif cmd == "rendezvous":
            from hvdtrain import dist  # horovod stays inside hvdtrain/dist.py

            port = dist.start_rendezvous_server(allocation())
            print(port, flush=True)
            sys.stdout.close()
            dist.serve_forever()
        elif cmd == "task":
            if rest and rest[0] == "--":
                rest = rest[1:]
            env = dict(os.environ)
            addr = env.get("HOROVOD_GLOO_RENDEZVOUS_ADDR") or socket.gethostname()
            env.update(task_env(env, allocation(env), addr, int(env["HOROVOD_GLOO_RENDEZVOUS_PORT"])))
            os.execvpe(rest[0], rest, env)
        else:
            print(f"launch.slurm: unknown command {cmd!r}\n{__doc__}", file=sys.stderr)
            return 2
    except SlurmEnvError as e:
        print(f"launch.slurm: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
