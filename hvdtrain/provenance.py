"""What a run records about itself: code SHA (and dirty files), config hash, data
fingerprint, versions, ranks. A run that quietly trains stale code on the wrong data (a
validation loss in the hundreds of millions and 0.5 % accuracy, where the healthy run has
loss 3.97 and 21 %) is the failure this makes loud: every hvdtrain run prints and stores
this banner."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str, repo: str = REPO) -> str | None:
    try:
        out = subprocess.run(["git", "-C", repo, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.rstrip("\n") if out.returncode == 0 else None  # keep status columns


def code_state(repo: str = REPO) -> dict:
    """{'git_sha', 'git_dirty', 'git_changed', 'git_behind', 'git_upstream', 'code_path'};
    sha 'unknown' outside a git checkout. `git_behind`: commits the checkout lacks from
    its upstream branch as of the last fetch (a stale checkout); no network is used."""
    base = {"code_path": repo}
    sha = (_git("rev-parse", "HEAD", repo=repo) or "").strip() or None
    if sha is None:
        return {**base, "git_sha": "unknown (not a git checkout)", "git_dirty": None, "git_changed": [],
                "git_behind": None, "git_upstream": None}
    status = _git("status", "--porcelain", "--untracked-files=no", repo=repo) or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    upstream = (_git("rev-parse", "--abbrev-ref", "--symbolic-full-name", "@{u}", repo=repo) or "").strip() or None
    behind = None
    if upstream:
        behind = int((_git("rev-list", "--count", "HEAD..@{u}", repo=repo) or "0").strip() or 0)
    return {**base, "git_sha": sha, "git_dirty": bool(changed), "git_changed": changed[:20],
            "git_behind": behind, "git_upstream": upstream}


def versions() -> dict:
    import numpy
    import torch

    v = {"python": platform.python_version(), "torch": torch.__version__, "numpy": numpy.__version__,
         "cuda": torch.version.cuda}
    for mod, key in (("nvidia.dali", "dali"), ("horovod", "horovod"), ("webdataset", "webdataset")):
        try:
            v[key] = __import__(mod, fromlist=["__version__"]).__version__
        except Exception:  # noqa: BLE001 - a missing optional package is recorded, not fatal
            v[key] = None
    return v


def slurm_job() -> dict | None:
    """The Slurm job this run belongs to, if any (recorded in every report)."""
    if "SLURM_JOB_ID" not in os.environ:
        return None
    return {k.lower(): os.environ.get(k) for k in ("SLURM_JOB_ID", "SLURM_JOB_NAME", "SLURM_JOB_NODELIST",
                                                   "SLURM_NTASKS", "SLURM_TASKS_PER_NODE", "SLURM_SUBMIT_DIR")}


def run_id(prefix: str) -> str:
    return f"{prefix}-{datetime.datetime.now().strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"


def describe_placement(placement: list[dict]) -> str:
    """`n1: rank 0 (local 0/1); n2: rank 1 (local 0/1); 2 node(s), cross size 2`."""
    by_node: dict[str, list[dict]] = {}
    for p in placement:
        by_node.setdefault(p["node"], []).append(p)
    nodes = "; ".join(f"{n}: rank {','.join(str(p['rank']) for p in ps)} (local "
                      f"{','.join(str(p['local_rank']) for p in ps)}/{ps[0]['local_size']})"
                      for n, ps in by_node.items())
    return f"{nodes}; {len(by_node)} node(s), cross size {max(p['cross_size'] for p in placement)}"


def banner(code: dict, config_hash: str, data: dict, ranks: int, device: str,
           placement: list[dict] | None = None) -> str:
    dirty = ""
    if code["git_dirty"]:
        dirty = f" DIRTY ({len(code['git_changed'])} changed: {', '.join(code['git_changed'][:5])})"
    if code.get("git_behind"):
        dirty += (f" STALE: {code['git_behind']} commit(s) behind {code['git_upstream']} as of the last fetch "
                  f"(git pull before trusting this run)")
    lines = [f"code    {code['git_sha']}{dirty}   from {code.get('code_path', REPO)}",
             f"config  {config_hash}",
             f"ranks   {ranks} x {device}   host {platform.node()}   python {sys.version.split()[0]}"]
    if placement:
        lines.append(f"nodes   {describe_placement(placement)}")
    job = slurm_job()
    if job:
        lines.append(f"slurm   job {job['slurm_job_id']} ({job['slurm_job_name']}) on {job['slurm_job_nodelist']}, "
                     f"{job['slurm_ntasks']} task(s)")
    for split, d in data.items():
        if d.get("synthetic"):
            lines.append(f"data    {split}: {d['banner']}")
            continue
        lines.append(f"data    {split}: {d['spec']} -> {d['shards']} shard(s) {d['first']} .. "
                     f"{os.path.basename(d['last'])}, {d['samples']} samples, fingerprint {d['fingerprint']}")
        if d.get("store"):
            how = "read through the node's shard cache" if d.get("remote") == "cache" else "read directly by DALI"
            lines.append(f"store   {split}: {d['store']}; {how}")
        if d.get("skipped") is not None:
            first = f": {d['skipped'][0]}" + (" ..." if len(d["skipped"]) > 1 else "") if d["skipped"] else ""
            lines.append(f"data    {split}: skipping {len(d['skipped'])} bad sample(s) (data.on_error=skip){first}")
    return "\n".join(lines)
