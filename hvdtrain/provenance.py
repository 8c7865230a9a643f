"""What a run records about itself: code SHA (and dirty files), config hash, data
fingerprint, versions, ranks. The seed's worst failure was a run that quietly trained
stale code on the wrong data; every hvdtrain run prints and stores this banner."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", REPO, *args], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.rstrip("\n") if out.returncode == 0 else None  # keep status columns


def code_state() -> dict:
    """{'git_sha', 'git_dirty', 'git_changed'}; sha 'unknown' outside a git checkout."""
    sha = (_git("rev-parse", "HEAD") or "").strip() or None
    if sha is None:
        return {"git_sha": "unknown (not a git checkout)", "git_dirty": None, "git_changed": []}
    status = _git("status", "--porcelain", "--untracked-files=no") or ""
    changed = [line[3:] for line in status.splitlines() if line.strip()]
    return {"git_sha": sha, "git_dirty": bool(changed), "git_changed": changed[:20]}


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


def banner(code: dict, config_hash: str, data: dict, ranks: int, device: str) -> str:
    dirty = ""
    if code["git_dirty"]:
        dirty = f" DIRTY ({len(code['git_changed'])} changed: {', '.join(code['git_changed'][:5])})"
    lines = [f"code    {code['git_sha']}{dirty}",
             f"config  {config_hash}",
             f"ranks   {ranks} x {device}   host {platform.node()}   python {sys.version.split()[0]}"]
    job = slurm_job()
    if job:
        lines.append(f"slurm   job {job['slurm_job_id']} ({job['slurm_job_name']}) on {job['slurm_job_nodelist']}, "
                     f"{job['slurm_ntasks']} task(s)")
    for split, d in data.items():
        lines.append(f"data    {split}: {d['spec']} -> {d['shards']} shard(s) {d['first']} .. "
                     f"{os.path.basename(d['last'])}, {d['samples']} samples, fingerprint {d['fingerprint']}")
    return "\n".join(lines)
