"""Is this GPU node healthy and fast? One command, one report.

    make gpu-check                              # = python -m bench.gpu_check
    python -m bench.gpu_check --dry-run         # the plan, and (no GPU needed) that every command parses
    python -m bench.gpu_check --only sanity,kernels
    python -m bench.gpu_check --budget-s 450 --copy-to $OUT    # launch/gpu_setup_check.sh's call

Runs the steps in the order of what their figures are worth per second of the device
call, since a budget cut (--budget-s) falls on the last ones: `bench.train --preset
resnet50` (AMP bf16, channels_last, real shards vs synthetic batches: does the loader
keep ResNet-50 fed?); `hvdtrain.sanity` with one rank per visible GPU (GO/NO-GO, the
85 % utilisation SLO); `bench.kernels`; the GPU-marked tests; `bench.loader` at 224 px
(a DALI threads x hw_decoder_load sweep) and at 64 px (a smaller one). Each step is
bounded by a timeout sized from its measured or reasoned cost (`Step.cost`, printed by
--dry-run); a step that runs into it gets SIGINT first and keeps what it wrote
(bench/steprun.py). Every figure is read from the command's JSON output and set beside
its target. Writes runs/gpu-check-<id>/gpu-check.{json,md} after every step and one log
per step, with the versions (driver, CUDA, torch, DALI, horovod, NCCL) and the GPU
model. Exit 0 only if every figure with a target passed (one not evaluated counts as not
passed), 1 otherwise; with no GPU it says so and exits 2 at once.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import time

from bench.steprun import Figure, Step, dry_check, expand, run_step

# ---------------------------------------------------------------- the commands, in one place
# A flag that changes in a module is a one-line fix here; tests/e2e/test_gpu_check.py's
# dry run fails first (it runs each module's own parser on these flags).
# 3 x 4 dali-gpu settings, each beside its ceiling, + dali-cpu, torch, pil: 3 timed windows each
LOADER_SWEEP = ("--loader", "all", "--threads", "4,8,16", "--hw-decoder-load", "0,0.65,0.9,0.99", "--windows", "3")
# 64 px: decode dominates as at 224 (the same 500x375 JPEGs), so the full sweep would cost
# as much again for figures with no target: dali-gpu at 2 x 2 settings, beside their ceilings
LOADER_SWEEP_64 = ("--loader", "dali-gpu", "--threads", "8,16", "--hw-decoder-load", "0.65,0.99", "--windows", "3")
COMMANDS: dict[str, tuple[str, ...]] = {
    # ImageNet-like 256 px JPEGs for bench.train: 8192 take ~15 s on one core
    "train-data": ("{py}", "-m", "data.synth", "{dir}/train-data", "--classes", "100", "--train", "8192",
                   "--val", "256", "--size", "256", "--seed", "1"),
    "train": ("{horovodrun}", "--gloo", "-np", "1", "-H", "localhost:1", "{py}", "-m", "bench.train", "--preset", "resnet50",
              "--train.amp=bf16", "--data.channels_last=True", "--data.train={dir}/train-data/train",
              "--train.steps=20", "--warmup=3", "--run-dir={dir}/train"),
    "sanity": ("{horovodrun}", "--gloo", "-np", "{gpus}", "-H", "localhost:{gpus}", "{py}", "-m", "hvdtrain.sanity",
               "--run.dir={dir}/sanity"),
    "kernels": ("{py}", "-m", "bench.kernels"),
    "gpu-tests": ("{py}", "-m", "pytest", "-q", "-rs", "--strict-markers", "-m", "gpu", "-p", "no:cacheprovider",
                  "--junitxml={dir}/gpu-tests.xml", "tests/gpu"),
    # bench.loader's 500x375 JPEGs, made once for both loader steps (made afresh by each
    # call they would cost each of them ~20 s)
    "loader-data": ("{py}", "-m", "bench.loader", "--make-data", "{dir}/loader-data", "--images", "1024"),
    "loader-224": ("{py}", "-m", "bench.loader", "--data", "{dir}/loader-data", *LOADER_SWEEP, "--size", "224",
                   "--run-dir", "{dir}/loader-224"),
    "loader-64": ("{py}", "-m", "bench.loader", "--data", "{dir}/loader-data", *LOADER_SWEEP_64, "--size", "64",
                  "--run-dir", "{dir}/loader-64"),
}

# ---------------------------------------------------------------- targets
MLPERF_RESNET50_IMG_S = {"H200": 7940.0, "H100": 7150.0}  # per GPU, MLPerf Training v4.0 (DESIGN.md)
DLE_RESNET50_A100_IMG_S = 2470  # NVIDIA DeepLearningExamples, AMP + DALI, per A100: a reference


def loader_target(ctx: dict) -> float | None:
    """The rate MLPerf's ResNet-50 consumes images at on this GPU; other GPUs: no target."""
    return next((v for k, v in MLPERF_RESNET50_IMG_S.items() if k in ctx.get("gpu_name", "")), None)


# ---------------------------------------------------------------- reading the outputs
def best(doc: dict, loader: str) -> dict | None:
    """The loader's fastest setting in a bench.loader BENCH_JSON (results: key -> {loader,
    img_s, threads, hw_decoder_load, vs_ceiling, gpu, ...})."""
    rows = [r for r in doc["results"].values() if r.get("loader") == loader and r.get("img_s")]
    return max(rows, key=lambda r: r["img_s"]) if rows else None


def field_of(row: dict | None, name: str):
    return None if row is None else row.get(name)


def gpu_of(row: dict | None, name: str):
    return None if row is None else (row.get("gpu") or {}).get(name)


def sanity_slo(doc: dict, name: str, key: str = "value"):
    return next(s.get(key) for s in doc["slos"] if s["name"] == name)


def dominant(breakdown: dict | None) -> str | None:
    """The step-time breakdown's verdict, e.g. 'data_wait 62% (data-bound)'."""
    if not breakdown or not breakdown.get("dominant"):
        return None
    return f"{breakdown['dominant']} {100 * breakdown['share']:.0f}% ({breakdown.get('bound')})"


def dmon_gap(doc: dict) -> float | None:
    g = doc["gpu"]
    nvml, dmon = g.get("util_mean_pct"), (g.get("dmon") or {}).get("sm_mean_pct")
    return None if nvml is None or dmon is None else abs(nvml - dmon)


def of_best(loader: str, name: str):
    """A reader: `name` of the loader's fastest setting."""
    return lambda d: field_of(best(d, loader), name)


def loader_figures(size: int, targets: bool, cpu_loaders: bool = True) -> tuple[Figure, ...]:
    p, op = f"loader_{size}", ">=" if targets else None
    cpu = (
        Figure(f"{p}_dali_cpu_img_s", f"{size} px: best dali-cpu img/s", of_best("dali-cpu", "img_s")),
        Figure(f"{p}_torch_img_s", f"{size} px: best torch DataLoader img/s", of_best("torch", "img_s")),
    ) if cpu_loaders else ()
    return (
        Figure(f"{p}_dali_gpu_img_s", f"{size} px: best dali-gpu img/s", of_best("dali-gpu", "img_s"), op,
               loader_target if targets else None, "MLPerf ResNet-50's rate per GPU" if targets else ""),
        Figure(f"{p}_dali_gpu_vs_ceiling", f"{size} px: best dali-gpu / ceiling at its setting",
               of_best("dali-gpu", "vs_ceiling"), op, 0.85),
        Figure(f"{p}_dali_gpu_threads", f"{size} px: best dali-gpu setting: DALI threads",
               of_best("dali-gpu", "threads")),
        Figure(f"{p}_dali_gpu_hw_decoder_load", f"{size} px: best dali-gpu setting: hw_decoder_load",
               of_best("dali-gpu", "hw_decoder_load")),
        Figure(f"{p}_jpeg_engines_util_pct", f"{size} px: JPEG engines' load at that setting (NVML)",
               lambda d: gpu_of(best(d, "dali-gpu"), "jpg_util_mean_pct"),
               why=lambda d: gpu_of(best(d, "dali-gpu"), "jpg_util_why") or "no dali-gpu measurement"),
        Figure(f"{p}_ceiling_img_s", f"{size} px: best decode-only ceiling img/s", of_best("ceiling-gpu", "img_s")),
        *cpu,
        Figure(f"{p}_rebuilds_in_windows", f"{size} px: pipeline rebuilds inside timed windows (all settings)",
               lambda d: sum(r.get("rebuilds_in_windows") or 0 for r in d["results"].values())),
        Figure(f"{p}_errors", f"{size} px: loader errors", lambda d: d["error"] or "none", "==", "none"),
    )


def listed(items: list[str], limit: int = 6) -> str:
    """A list of "test: reason" for a report cell: 'none', or the first few and a count."""
    if not items:
        return "none"
    more = f" (and {len(items) - limit} more)" if len(items) > limit else ""
    return f"{len(items)}: " + "; ".join(items[:limit]) + more


TEST_FIGURES = (
    Figure("gpu_tests_failed", "GPU tests failed or errored", lambda d: d["failures"] + d["errors"], "==", 0),
    Figure("gpu_tests_unexpected_skips", "GPU tests skipped for no machine reason (HVDTRAIN_REQUIRE_GPU=1)",
           lambda d: len(d["unexpected_skips"]), "==", 0),
    Figure("gpu_tests_passed", "GPU tests passed", lambda d: d["passed"], ">=", 1),
    Figure("gpu_tests_expected_skips", "GPU tests skipped as expected on this machine",
           lambda d: listed(d["expected_skips"])),
    Figure("gpu_tests_not_passed", "GPU tests that failed, and why", lambda d: listed(d["not_passed"] +
                                                                                   d["unexpected_skips"])),
)

# In value-per-second order (a budget cut falls on the last steps). `cost`: what each
# timeout is sized from; "reasoned" costs are estimates for one H100/H200 with 16 cores
# (no GPU run yet), each timeout about 1.5-2x its cost. The timeouts add up to 560 s; the
# budget (--budget-s: what set-up left of the call) cuts the last ones.
STEPS: tuple[Step, ...] = (
    Step("train-data", COMMANDS["train-data"], 30, "none",
         cost="measured: 8192 JPEGs at 256 px in ~15 s on one core of the 2-core CPU machine"),
    Step("train", COMMANDS["train"], 75, "bench_json", (
        Figure("train_amp_channels_last", "AMP bf16 and channels_last in effect",
               lambda d: [d["config"]["train"]["amp"], d["config"]["data"]["channels_last"]], "==", ["bf16", True]),
        Figure("train_real_over_synthetic", "real shards / synthetic batches img/s", lambda d: d["real_over_synthetic"],
               ">=", 0.95),
        Figure("train_real_img_s", "ResNet-50 img/s on real shards (DALI mixed)",
               lambda d: d["real"]["steady_images_per_s"], reference=f"DeepLearningExamples: {DLE_RESNET50_A100_IMG_S} "
               "img/s per A100 (AMP, DALI); a reference, not a target"),
        Figure("train_synthetic_img_s", "ResNet-50 img/s on synthetic batches",
               lambda d: d["synthetic"]["steady_images_per_s"]),
        Figure("train_gpu_util_pct", "GPU utilisation on real shards, NVML mean", lambda d: d["gpu"]["util_mean_pct"],
               why=lambda d: d["gpu"].get("why")),
        Figure("train_dominant_phase", "real shards: where the step time went (largest share)",
               lambda d: dominant(d["breakdown"])),
    ), exit_marks="1", cost="reasoned, ~40 s: horovodrun and imports ~10 s, CUDA, cuDNN and DALI start ~10 s, "
                            "2 x 23 steps of batch 256 at ~3,000 img/s ~4 s, the rest its report"),
    Step("sanity", COMMANDS["sanity"], 80, "json:{dir}/sanity/sanity.json", (
        Figure("sanity_verdict", "sanity verdict", lambda d: d["verdict"], "==", "GO"),
        Figure("sanity_gpu_util_pct", "GPU utilisation, NVML mean (rank 0's GPU)",
               lambda d: sanity_slo(d, "gpu_util_pct"), ">=", 85.0,
               why=lambda d: sanity_slo(d, "gpu_util_pct", "not_evaluated")),
        Figure("sanity_dmon_gap_pct", "NVML vs nvidia-smi dmon utilisation, points apart", dmon_gap, "<=", 10.0,
               why=lambda d: d["gpu"].get("why") or (d["gpu"].get("dmon") or {}).get("why")),
        Figure("sanity_sm_util_pct", "SM utilisation, NVML GPM mean", lambda d: d["gpu"].get("sm_util_mean_pct"),
               why=lambda d: d["gpu"].get("sm_util_why")),
        Figure("sanity_max_vram_gib", "max VRAM, GiB (torch max allocated, rank 0)", lambda d: d["max_memory_gib"]),
        Figure("sanity_img_s", "sanity training img/s, all ranks", lambda d: d["images_per_s"]),
        Figure("sanity_dominant_phase", "where the step time went (largest share)", lambda d: dominant(d["breakdown"])),
    ), exit_marks="{gpus}", cost="reasoned, ~45 s: the embedded data set (5,120 JPEGs at 64 px) ~5 s, start ~15 s, "
                                 "1,600 micro-batches of 16 at a few ms each (launch-bound)"),
    Step("kernels", COMMANDS["kernels"], 40, "bench_json", (
        Figure("kernels_compiled", "Triton kernels compiled, not interpreted", lambda d: d["interpreter"], "==", False),
        Figure("kernels_copy_bw_gb_s", "device copy bandwidth, GB/s (read + write)", lambda d: d["copy_bw_gb_s"]),
        *(Figure(f"kernels_{key}_of_copy_bw", f"{op}: Triton, fraction of copy bandwidth",
                 lambda d, op=op: next(r["fraction_of_copy_bw"] for r in d["results"]
                                       if r["op"] == op and r["impl"].startswith("triton")))
          for key, op in (("normalize", "normalize"), ("mix", "mix"), ("soft_ce", "soft CE fwd+bwd"))),
    ), exit_marks="1", cost="reasoned, ~20 s: torch and CUDA start ~8 s, three Triton compiles ~2 s each, timing"),
    Step("gpu-tests", COMMANDS["gpu-tests"], 120, "junit:{dir}/gpu-tests.xml", TEST_FIGURES,
         env={"HVDTRAIN_REQUIRE_GPU": "1"}, dry="collect", grace_s=15,
         cost="reasoned, ~90 s: 37 tests; 2 subprocesses with CUDA start and 3 s of matmuls, ~12 DALI pipelines, "
              "Triton compiles for 6 normalize variants; on a timeout SIGINT keeps the tests that ran"),
    Step("loader-data", COMMANDS["loader-data"], 40, "none",
         cost="measured: 1,024 JPEGs of 500x375 in ~20 s on one core of the 2-core CPU machine"),
    Step("loader-224", COMMANDS["loader-224"], 130, "bench_json", loader_figures(224, True), exit_marks="1",
         grace_s=15, cost="reasoned, ~90 s: 34 settings; a GPU one ~1.5 s (build + 1,792 images), a CPU one 3-12 s; "
                          "on a timeout SIGINT keeps the settings measured"),
    Step("loader-64", COMMANDS["loader-64"], 45, "bench_json", loader_figures(64, False, cpu_loaders=False),
         exit_marks="1", cost="reasoned, ~25 s: 8 GPU settings of ~1.5 s, start ~10 s"),
)


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
    verdict = "PASS" if report["passed"] else "FAIL: " + ", ".join(report["failed_steps"]) if report["failed_steps"] \
        else "INCOMPLETE"
    lines = [f"# gpu-check: {verdict}" + ("" if report["complete"] else " (incomplete: not every step ran)"), "",
             f"GPU: {', '.join(v.get('gpus') or ['?'])}; driver {v.get('driver')} (CUDA {v.get('cuda_driver')}); "
             f"torch {v.get('torch')} (CUDA {v.get('cuda_torch')}); NCCL {v.get('nccl')}; DALI {v.get('dali')}; "
             f"horovod {v.get('horovod')}; git {report['git_sha'][:12]}", ""]
    if report.get("pending"):
        lines += [f"Not yet run: {', '.join(report['pending'])}", ""]
    for s in report["steps"]:
        if s.get("not_run"):
            lines += [f"## {s['name']}: NOT RUN ({s['not_run']})", "", f"`{' '.join(s['argv'])}`", ""]
            continue
        ended = (f", timed out: ended by {s['ended_by']}" if s.get("timed_out") else "") + \
            (f", {s['crash_at_exit']}" if s.get("crash_at_exit") else "")
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


def dry_run(steps: tuple[Step, ...], ctx: dict) -> int:
    """Print the plan; check, with no GPU, that every command in it parses."""
    bad = 0
    total = sum(s.timeout_s for s in steps)
    print(f"gpu_check --dry-run: {len(steps)} steps, timeouts adding up to {total} s")
    for s in steps:
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

    p = argparse.ArgumentParser(prog="python -m bench.gpu_check", description=__doc__.split("\n\n")[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and check its commands parse (no GPU)")
    p.add_argument("--only", default="", help="comma-separated step names (default: all, in order)")
    p.add_argument("--run-dir", default="", help="report folder (default runs/gpu-check-<id>)")
    p.add_argument("--budget-s", type=float, default=0.0,
                   help="end the whole plan within this many seconds: cut the last step's timeout, "
                        "skip steps with no time left (default: each step's own timeout)")
    p.add_argument("--copy-to", default="",
                   help="also write gpu-check.json, gpu-check.md and gpu-check-logs.txt (every log's tail) "
                        "to this flat folder after every step (a device call's $OUT)")
    a = p.parse_args(argv)
    t0 = time.monotonic()  # the budget counts from here: reading the versions takes some of it
    names = [s.name for s in STEPS]
    only = [n for n in a.only.split(",") if n]
    if set(only) - set(names):
        p.error(f"unknown step(s) {sorted(set(only) - set(names))}; steps: {names}")
    steps = tuple(s for s in STEPS if not only or s.name in only)
    bindir = os.path.dirname(sys.executable)
    hvdrun = os.path.join(bindir, "horovodrun") if os.path.exists(os.path.join(bindir, "horovodrun")) \
        else (shutil.which("horovodrun") or "horovodrun")
    if a.dry_run:
        with tempfile.TemporaryDirectory(prefix="gpu-check-dry-") as tmp:
            return dry_run(steps, {"py": sys.executable, "horovodrun": hvdrun, "gpus": 1, "dir": tmp})
    import torch

    if not torch.cuda.is_available():
        print("no GPU: nothing to check")
        return 2
    run_dir = os.path.abspath(a.run_dir or os.path.join("runs", provenance.run_id("gpu-check")))
    os.makedirs(run_dir, exist_ok=True)
    v = versions()
    ctx = {"py": sys.executable, "horovodrun": hvdrun, "gpus": torch.cuda.device_count(), "dir": run_dir,
           "gpu_name": (v.get("gpus") or [""])[0]}
    print(f"gpu_check: {ctx['gpus']} x {ctx['gpu_name']}, driver {v.get('driver')}; report in {run_dir}", flush=True)
    budget_s = a.budget_s - (time.monotonic() - t0) if a.budget_s else None
    report = run_plan(steps, ctx, run_dir, v, budget_s=budget_s, copy_to=a.copy_to or None)
    return 0 if report["passed"] else 1


MIN_STEP_S = 20  # a step with less of the budget left than this is not started


def not_run(step: Step, ctx: dict, why: str) -> dict:
    """The result of a step the budget left no time for."""
    return {"name": step.name, "argv": expand(step.argv, ctx), "timeout_s": 0, "wall_s": 0.0, "exit": None,
            "timed_out": False, "log": "", "passed": False, "not_run": why,
            "figures": [{"key": f"{step.name}.exit", "label": "exit status", "op": "==", "target": 0, "value": None,
                         "reference": None, "status": "NOT EVALUATED", "why": why}]}


def log_tails(results: list[dict], lines: int = 40) -> str:
    """The last lines of every step's log, one file for a person to read first."""
    out = []
    for r in results:
        out.append(f"===== {r['name']}: {r.get('not_run') or r['log']}")
        if r["log"] and os.path.exists(r["log"]):
            with open(r["log"], errors="replace") as f:
                out += [line.rstrip("\n") for line in f.readlines()[-lines:]]
    return "\n".join(out) + "\n"


def write_report(report: dict, run_dir: str, copy_to: str | None) -> None:
    """gpu-check.json and .md in the run folder; with copy_to, those two and
    gpu-check-logs.txt (every log's tail) also in that flat folder (a device call's $OUT)."""
    def put(path: str, text: str) -> None:  # whole or not at all: a call may end mid-write
        with open(path + ".tmp", "w") as f:
            f.write(text)
        os.replace(path + ".tmp", path)
    for d in (run_dir, copy_to) if copy_to else (run_dir,):
        os.makedirs(d, exist_ok=True)
        put(os.path.join(d, "gpu-check.json"), json.dumps(report, indent=1, default=str))
        put(os.path.join(d, "gpu-check.md"), markdown(report))
    if copy_to:
        put(os.path.join(copy_to, "gpu-check-logs.txt"), log_tails(report["steps"]))


def run_plan(steps: tuple[Step, ...], ctx: dict, run_dir: str, versions_: dict, budget_s: float | None = None,
             copy_to: str | None = None) -> dict:
    """Every step in order (a failed step does not stop the others). gpu-check.json and
    gpu-check.md are rewritten after each step (`complete: false` until the last), so a
    run cut short still leaves what it measured. With budget_s, the whole plan ends within
    that many seconds: a step's timeout is cut to what is left, and a step with under
    MIN_STEP_S left is not run (named in the report)."""
    from hvdtrain import provenance

    deadline = time.monotonic() + budget_s if budget_s else None
    results: list[dict] = []
    report: dict = {"passed": False, "complete": False, "failed_steps": [], "run_dir": run_dir,
                    "versions": versions_, "git_sha": provenance.code_state()["git_sha"], "gpus": ctx["gpus"],
                    "steps": [], "pending": [s.name for s in steps]}
    write_report(report, run_dir, copy_to)  # a first step that outlives the call still leaves the plan
    for i, s in enumerate(steps):
        left = deadline - time.monotonic() if deadline else None
        if left is not None and left < MIN_STEP_S:
            why = f"not run: {budget_s:.0f} s budget (--budget-s) spent"
            print(f"gpu_check: [{s.name}] {why}", flush=True)
            results.append(not_run(s, ctx, why))
        else:
            if left is not None and left < s.timeout_s:
                s = dataclasses.replace(s, timeout_s=int(left))
            results.append(run_step(s, ctx, run_dir))
        failed = [r["name"] for r in results if not r["passed"]]
        last = i == len(steps) - 1
        complete = last and not any(r.get("not_run") for r in results)
        report = {"passed": not failed and last, "complete": complete,
                  "failed_steps": failed, "run_dir": run_dir, "versions": versions_,
                  "git_sha": report["git_sha"], "gpus": ctx["gpus"], "steps": results,
                  "pending": [t.name for t in steps[i + 1:]]}
        write_report(report, run_dir, copy_to)
    failed = report["failed_steps"]
    print(f"\ngpu_check: {'PASS' if not failed else 'FAIL: ' + ', '.join(failed)}; report: {run_dir}/gpu-check.md",
          flush=True)
    return report


if __name__ == "__main__":
    sys.exit(main())
