"""Is this GPU node healthy and fast? One command, one report (docs/gpu-check.md).

    make gpu-check                                  # = python -m gpucheck
    make gpu-check ARGS="--out runs/node-a"         # the report folder of your choice
    python -m gpucheck --dry-run                    # the plan, and (no GPU needed) that every command parses
    python -m gpucheck --only sanity,kernels
    python -m gpucheck --budget-s 1200 --copy-to /shared/node-a   # end within 20 min; a flat copy of the report

Runs the stages of gpucheck/plan.py in the order of what their figures are worth per
second, so that a time limit (--budget-s) falls on the last ones: `bench.throughput
--preset resnet50` (AMP bf16, channels_last, real shards vs synthetic batches: does the
loader keep ResNet-50 fed?); `hvdtrain.sanity` with one rank per visible GPU (GO/NO-GO,
the 85 % utilisation SLO), then with one rank more (it must stop at once, saying what to
run instead); `bench.kernels`; the GPU-marked tests; `bench.loader` at 224 px (a DALI
threads x hw_decoder_load sweep); `make test`'s unit and parallel rooms on this node (what
fails or skips here is listed); `bench.loader` at 64 px (a smaller sweep). Each stage is
bounded by a timeout sized from its measured or reasoned cost (`Stage.cost`, printed by
--dry-run); a stage that runs into it gets SIGINT first and keeps what it wrote
(gpucheck/runner.py). Every figure is read from the command's JSON output and set beside
its target. Writes gpu-check.json, gpu-check.md and gpu-check-logs.txt (every log's tail)
into the report folder (--out, default runs/gpu-check-<id>) after every stage, one log per
stage beside them, with the versions (driver, CUDA, torch, DALI, horovod, NCCL) and the
GPU model. Exit 0 only if every figure with a target passed (one not evaluated counts as
not passed), 1 otherwise; with no GPU it says so and exits 2 at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

from gpucheck.plan import COMMANDS, STAGES  # noqa: F401 (the plan; COMMANDS for readers of this module)
from gpucheck.runner import Stage, dry_check, expand, run_stage

# ---------------------------------------------------------------- versions, report, main
VERSIONS = r"""
import importlib.metadata as m, json, torch
def dist(*names):
    for n in names:
        try:
            return m.version(n)
        except m.PackageNotFoundError:
            pass
gpu = torch.cuda.is_available()
print(json.dumps({"torch": torch.__version__, "cuda_torch": torch.version.cuda,
                  "gpus": [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())],
                  "nccl": ".".join(map(str, torch.cuda.nccl.version())) if gpu else None,
                  "dali": dist("nvidia-dali-cuda130", "nvidia-dali-cuda120"), "horovod": dist("horovod")}))
"""


def versions() -> dict:
    """Driver and its CUDA (nvidia-smi), torch and its CUDA, NCCL, DALI, horovod, GPU models:
    read in a child process, so this one never holds a CUDA context."""
    out = subprocess.run([sys.executable, "-c", VERSIONS], capture_output=True, text=True, timeout=120)
    v = json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr[-500:]}
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30).stdout.strip().splitlines()
        head = subprocess.run(["nvidia-smi"], capture_output=True, text=True, timeout=30).stdout
        v["driver"] = smi[0].split(",")[-1].strip() if smi else None
        v["cuda_driver"] = head.split("CUDA Version:")[1].split()[0] if "CUDA Version:" in head else None
    except (OSError, subprocess.TimeoutExpired) as e:
        v["driver"] = v["cuda_driver"] = f"nvidia-smi failed: {e}"
    return v


def fmt(x) -> str:
    if x is None:
        return "-"
    return f"{x:.4g}" if isinstance(x, float) else str(x)


def markdown(report: dict) -> str:
    v = report["versions"]
    verdict = "PASS" if report["passed"] else "FAIL: " + ", ".join(report["failed_stages"]) \
        if report["failed_stages"] else "INCOMPLETE"
    lines = [f"# gpu-check: {verdict}" + ("" if report["complete"] else " (incomplete: not every stage ran)"), "",
             f"GPU: {', '.join(v.get('gpus') or ['?'])}; driver {v.get('driver')} (CUDA {v.get('cuda_driver')}); "
             f"torch {v.get('torch')} (CUDA {v.get('cuda_torch')}); NCCL {v.get('nccl')}; DALI {v.get('dali')}; "
             f"horovod {v.get('horovod')}; git {report['git_sha'][:12]}", ""]
    if report.get("pending"):
        lines += [f"Not yet run: {', '.join(report['pending'])}", ""]
    for s in report["stages"]:
        if s.get("not_run"):
            lines += [f"## {s['name']}: NOT RUN ({s['not_run']})", "", f"`{' '.join(s['argv'])}`", ""]
            continue
        ended = (f", timed out: ended by {s['ended_by']}" if s.get("timed_out") else "") + \
            (f", {s['crash_at_exit']}" if s.get("crash_at_exit") else "") + \
            (f", {s['refused']}" if s.get("refused") else "")
        lines += [f"## {s['name']}: {'PASS' if s['passed'] else 'FAIL'} ({s['wall_s']} s of {s['timeout_s']} s{ended})",
                  "",
                  f"`{' '.join(s['argv'])}`  (log: `{os.path.basename(s['log'])}`)", "",
                  "| figure | measured | target | result |", "|---|---|---|---|"]
        for f in s["figures"]:
            target = f"{f['op']} {fmt(f['target'])}" if f["op"] and f["target"] is not None else (f["reference"] or "-")
            result = f["status"] + (f": {f['why']}" if f["why"] else "")
            cells = (f["label"], fmt(f["value"]), target, result)
            lines.append("| " + " | ".join(str(c).replace("|", "\\|") for c in cells) + " |")
        lines.append("")
    return "\n".join(lines)


def dry_run(stages: tuple[Stage, ...], ctx: dict) -> int:
    """Print the plan; check, with no GPU, that every command in it parses."""
    bad = 0
    total = sum(s.timeout_s for s in stages)
    print(f"gpu_check --dry-run: {len(stages)} stages, timeouts adding up to {total} s")
    for s in stages:
        print(f"\n[{s.name}] timeout {s.timeout_s} s: {' '.join(s.argv)}")
        if s.cost:
            print(f"    cost: {s.cost}")
        for f in s.figures:
            target = f"{f.op} {getattr(f.target, '__name__', f.target)}" if f.op else "reported"
            print(f"    {f.key:<44} {target}")
        problems = dry_check(s, ctx, ctx["dir"])
        bad += bool(problems)
        print("    parses: " + ("yes" if not problems else "NO\n      " + "\n      ".join(problems)))
    return 1 if bad else 0


def main(argv: list[str] | None = None) -> int:
    import shutil
    import tempfile

    from hvdtrain import provenance

    p = argparse.ArgumentParser(prog="python -m gpucheck", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and check its commands parse (no GPU)")
    p.add_argument("--only", default="", metavar="NAMES", help="comma-separated stage names (default: all, in order)")
    p.add_argument("--out", "--run-dir", dest="out", default="", metavar="DIR",
                   help="report folder: gpu-check.{json,md}, gpu-check-logs.txt, one log and the data of "
                        "every stage (default runs/gpu-check-<id>); a stage run again there replaces its results")
    p.add_argument("--budget-s", type=float, default=0.0, metavar="S",
                   help="end the whole check within this many seconds (what is left of a node's time): "
                        "cut the last stage's timeout, skip stages with no time left and name them NOT RUN "
                        "(default: no limit, each stage its own timeout)")
    p.add_argument("--copy-to", default="", metavar="DIR",
                   help="also write gpu-check.json, gpu-check.md and gpu-check-logs.txt to this flat folder "
                        "after every stage (a shared folder to read from elsewhere while the check runs)")
    a = p.parse_args(argv)
    t0 = time.monotonic()  # the budget counts from here: reading the versions takes some of it
    names = [s.name for s in STAGES]
    only = [n for n in a.only.split(",") if n]
    if set(only) - set(names):
        p.error(f"unknown stage(s) {sorted(set(only) - set(names))}; stages: {names}")
    stages = tuple(s for s in STAGES if not only or s.name in only)
    bindir = os.path.dirname(sys.executable)
    hvdrun = os.path.join(bindir, "horovodrun") if os.path.exists(os.path.join(bindir, "horovodrun")) \
        else (shutil.which("horovodrun") or "horovodrun")
    if a.dry_run:
        with tempfile.TemporaryDirectory(prefix="gpu-check-dry-") as tmp:
            return dry_run(stages, {"py": sys.executable, "horovodrun": hvdrun, "gpus": 1, "dir": tmp})
    import torch

    if not torch.cuda.is_available():
        print("no GPU: nothing to check")
        return 2
    run_dir = os.path.abspath(a.out or os.path.join("runs", provenance.run_id("gpu-check")))
    os.makedirs(run_dir, exist_ok=True)
    v = versions()
    ctx = {"py": sys.executable, "horovodrun": hvdrun, "gpus": torch.cuda.device_count(), "dir": run_dir,
           "gpu_name": (v.get("gpus") or [""])[0]}
    print(f"gpu_check: {ctx['gpus']} x {ctx['gpu_name']}, driver {v.get('driver')}; report in {run_dir}", flush=True)
    budget_s = a.budget_s - (time.monotonic() - t0) if a.budget_s else None
    report = run_plan(stages, ctx, run_dir, v, budget_s=budget_s, copy_to=a.copy_to or None)
    return 0 if report["passed"] else 1


MIN_STAGE_S = 20  # a stage with less of the budget left than this is not started


def not_run(stage: Stage, ctx: dict, why: str) -> dict:
    """The result of a stage the budget left no time for."""
    return {"name": stage.name, "argv": expand(stage.argv, ctx), "timeout_s": 0, "wall_s": 0.0, "exit": None,
            "timed_out": False, "log": "", "passed": False, "not_run": why,
            "figures": [{"key": f"{stage.name}.exit", "label": "exit status", "op": "==", "target": 0, "value": None,
                         "reference": None, "status": "NOT EVALUATED", "why": why}]}


def log_tails(results: list[dict], lines: int = 40) -> str:
    """The last lines of every stage's log, one file for a person to read first."""
    out = []
    for r in results:
        out.append(f"===== {r['name']}: {r.get('not_run') or r['log']}")
        if r["log"] and os.path.exists(r["log"]):
            with open(r["log"], errors="replace") as f:
                out += [line.rstrip("\n") for line in f.readlines()[-lines:]]
    return "\n".join(out) + "\n"


def write_report(report: dict, run_dir: str, copy_to: str | None) -> None:
    """gpu-check.json, gpu-check.md and gpu-check-logs.txt (every log's tail) in the report
    folder, and with copy_to in that flat folder too."""
    def put(path: str, text: str) -> None:  # whole or not at all: the check may be ended mid-write
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    for d in (run_dir, copy_to) if copy_to else (run_dir,):
        os.makedirs(d, exist_ok=True)
        put(os.path.join(d, "gpu-check.json"), json.dumps(report, indent=1, default=str))
        put(os.path.join(d, "gpu-check.md"), markdown(report))
        put(os.path.join(d, "gpu-check-logs.txt"), log_tails(report["stages"]))


def run_plan(stages: tuple[Stage, ...], ctx: dict, run_dir: str, versions_: dict, budget_s: float | None = None,
             copy_to: str | None = None) -> dict:
    """Every stage in order (a failed stage does not stop the others). The report is
    rewritten after each stage (`complete: false` until the last), so a check cut short
    (the node taken back, the job's time limit) still leaves what it measured. With
    budget_s, the whole plan ends within that many seconds: a stage's timeout is cut to
    what is left, and a stage with under MIN_STAGE_S left is not run (named in the report)."""
    from hvdtrain import provenance

    deadline = time.monotonic() + budget_s if budget_s else None
    results: list[dict] = []
    report: dict = {"passed": False, "complete": False, "failed_stages": [], "run_dir": run_dir,
                    "versions": versions_, "git_sha": provenance.code_state()["git_sha"], "gpus": ctx["gpus"],
                    "stages": [], "pending": [s.name for s in stages]}
    write_report(report, run_dir, copy_to)  # the plan is on disk before the first stage starts
    for i, s in enumerate(stages):
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left < MIN_STAGE_S:
            why = f"not run: {budget_s:.0f} s budget (--budget-s) spent"
            print(f"gpu_check: [{s.name}] {why}", flush=True)
            results.append(not_run(s, ctx, why))
        else:
            if left is not None and left < s.timeout_s:
                s = dataclasses.replace(s, timeout_s=int(left))
            results.append(run_stage(s, ctx, run_dir))
        failed = [r["name"] for r in results if not r["passed"]]
        last = i == len(stages) - 1
        complete = last and not any(r.get("not_run") for r in results)
        report = {"passed": not failed and last, "complete": complete,
                  "failed_stages": failed, "run_dir": run_dir, "versions": versions_,
                  "git_sha": report["git_sha"], "gpus": ctx["gpus"], "stages": results,
                  "pending": [t.name for t in stages[i + 1:]]}
        write_report(report, run_dir, copy_to)
    failed = report["failed_stages"]
    print(f"\ngpu_check: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}; report: {run_dir}/gpu-check.md",
          flush=True)
    return report


if __name__ == "__main__":
    sys.exit(main())
