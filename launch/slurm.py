"""Turn a Slurm allocation into a Horovod launch.

    python -m launch.slurm command hvdtrain.sanity --preset ci     # print the launch command
    python -m launch.slurm hosts                                    # host1:2,host2:2
    python -m launch.slurm task CMD...                              # srun mode: one rank per task

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
    # --gloo: hvdtrain's Horovod is built with Gloo (launch/install_horovod.sh); without it
    # horovodrun first imports torch in a child process to ask whether MPI is built (~3 s)
    return [horovodrun, "--gloo", *shlex.split(extra), "-np", str(sum(k for _, k in alloc)), "-H", horovod_hosts(alloc),
            python, "-m", module, *args]


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
            if launcher == "horovodrun":
                hvdrun = os.path.join(os.path.dirname(python), "horovodrun")
                line = horovodrun_command(alloc, python, rest[0], rest[1:],
                                          hvdrun if os.path.exists(hvdrun) else "horovodrun",
                                          os.environ.get("HOROVODRUN_ARGS", ""))
            elif launcher == "srun":
                line = srun_command(alloc, python, rest[0], rest[1:])
            else:
                raise SlurmEnvError(f"LAUNCHER must be horovodrun or srun, not {launcher!r}")
            print(shlex.join(line))
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
