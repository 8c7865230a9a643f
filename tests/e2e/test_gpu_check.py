"""`make gpu-check` on the CPU: it stops at once with no GPU, its plan parses (each module's
own argument parser accepts the plan's flags: this is what catches a flag that drifted),
and a stage that fails or hangs fails the check with that stage named. The runner is the
real one, on real subprocesses; only the plan is small."""
import dataclasses
import json
import os
import sys
import time

import psutil
import pytest
import torch

from gpucheck import check as G
from gpucheck.runner import Figure, Stage, dry_check
from tests.conftest import ROOT
from tests.e2e.harness import run

PY = sys.executable


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_no_gpu_says_so_and_exits_2_at_once():
    t0 = time.monotonic()
    r = run([PY, "-m", "gpucheck"], timeout=60)
    assert r.returncode == 2 and r.stdout.strip() == "no GPU: nothing to check", r.stdout + r.stderr
    assert time.monotonic() - t0 < 30
    assert not any(d.startswith("gpu-check-") for d in os.listdir(os.path.join(ROOT, "runs")))


@pytest.mark.parametrize("stage", G.STAGES, ids=[s.name for s in G.STAGES])
def test_the_plans_commands_parse(stage, tmp_path):
    """Each command's module exists and its parser accepts the plan's flags; horovodrun's
    flags pass horovodrun's parser; pytest collects the GPU tests. A failure names the stage
    and quotes the parser's error: fix the flag in gpucheck/plan.py's COMMANDS."""
    ctx = {"py": PY, "horovodrun": os.path.join(os.path.dirname(PY), "horovodrun"), "gpus": 1, "dir": str(tmp_path)}
    assert dry_check(stage, ctx, str(tmp_path)) == [], f"gpu-check stage {stage.name!r} would not run"


def test_dry_run_prints_the_plan(tmp_path):
    r = run([PY, "-m", "gpucheck", "--dry-run", "--only", "kernels,train-data"], timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "[kernels] timeout 40 s: {py} -m bench.kernels" in r.stdout
    assert "kernels_compiled" in r.stdout and r.stdout.count("parses: yes") == 2
    # the stages through the 224 px sweep (every target but the rooms'), with the version
    # reading around them, fit a ten-minute budget (--budget-s 600; the plan's order:
    # tests/e2e/test_gpu_plan_rehearsal.py)
    names = [s.name for s in G.STAGES]
    assert sum(s.timeout_s for s in G.STAGES[:names.index("loader-224") + 1]) <= 570


def test_dry_run_names_a_flag_no_parser_accepts(tmp_path):
    bad = Stage("bad-flag", ("{py}", "-m", "bench.kernels", "--no-such-flag", "1"), 10, "bench_json")
    ctx = {"py": PY, "horovodrun": "horovodrun", "gpus": 1, "dir": str(tmp_path)}
    problems = dry_check(bad, ctx, str(tmp_path))
    assert len(problems) == 1 and "unrecognized arguments: --no-such-flag 1" in problems[0]
    missing = Stage("missing", ("{py}", "-m", "bench.no_such_module"), 10, "none")
    assert dry_check(missing, ctx, str(tmp_path)) == ["module bench.no_such_module not found"]


# a grandchild that outlives a killed parent would keep running after the check: it must die too
HANG = ("import subprocess, sys, time; "
        "c = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
        "open(sys.argv[1], 'w').write(str(c.pid)); time.sleep(120)")


def fake_plan(tmp_path):
    bench = 'print("noise"); print("BENCH_JSON " + __import__("json").dumps({"img_s": 100.0, "error": None}))'
    return (
        Stage("good", ("{py}", "-c", bench), 30, "bench_json",
             (Figure("good_img_s", "img/s", lambda d: d["img_s"], ">=", 50.0),)),
        Stage("slow-figure", ("{py}", "-c", bench), 30, "bench_json",
             (Figure("slow_img_s", "img/s", lambda d: d["img_s"], ">=", lambda ctx: ctx["want"]),
              Figure("absent", "a field the output lacks", lambda d: d["nope"], "==", 1))),
        Stage("crashes", ("{py}", "-c", "import sys; print('boom'); sys.exit(3)"), 30, "bench_json",
             (Figure("crash_img_s", "img/s", lambda d: d["img_s"], ">=", 1.0),)),
        Stage("hangs", ("{py}", "-c", HANG, str(tmp_path / "grandchild.pid")), 3, "bench_json"),
    )


def test_a_failing_or_hanging_stage_fails_the_check_and_is_named(tmp_path):
    ctx = {"py": PY, "horovodrun": "horovodrun", "gpus": 1, "dir": str(tmp_path), "want": 200.0}
    t0 = time.monotonic()
    report = G.run_plan(fake_plan(tmp_path), ctx, str(tmp_path), {"gpus": ["fake"]})
    assert time.monotonic() - t0 < 25  # the hang cost its timeout, not its sleep
    assert report["passed"] is False and report["failed_stages"] == ["slow-figure", "crashes", "hangs"]
    stages = {s["name"]: s for s in report["stages"]}
    figs = {f["key"]: f for s in report["stages"] for f in s["figures"]}
    assert stages["good"]["passed"] and figs["good_img_s"]["status"] == "PASS" and figs["good_img_s"]["value"] == 100
    assert figs["slow_img_s"]["status"] == "FAIL" and figs["slow_img_s"]["target"] == 200
    assert figs["absent"]["status"] == "NOT EVALUATED" and "KeyError" in figs["absent"]["why"]
    assert figs["crashes.exit"]["value"] == 3 and figs["crash_img_s"]["status"] == "NOT EVALUATED"
    assert "no BENCH_JSON line" in figs["crash_img_s"]["why"]
    assert stages["hangs"]["timed_out"] and "timed out after 3 s" in figs["hangs.exit"]["why"]
    grandchild = int((tmp_path / "grandchild.pid").read_text())
    assert not psutil.pid_exists(grandchild) or psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE
    # the files a person and a program read
    on_disk = json.loads((tmp_path / "gpu-check.json").read_text())
    assert on_disk["failed_stages"] == ["slow-figure", "crashes", "hangs"] and on_disk["complete"]
    md = (tmp_path / "gpu-check.md").read_text()
    assert md.startswith("# gpu-check: FAIL: slow-figure, crashes, hangs")
    assert "| img/s | 100 | >= 200 | FAIL |" in md
    assert "boom" in (tmp_path / "crashes.log").read_text()
    assert "===== crashes:" in (tmp_path / "gpu-check-logs.txt").read_text()  # every log's tail, in the folder too


def test_a_budget_cuts_the_last_timeout_and_names_the_stages_it_left_out(tmp_path, monkeypatch):
    """--budget-s: the plan ends within the budget (what is left of a node's time); a stage
    with no time left is reported as not run; --copy-to gets the report and the logs' tails
    after every stage, in one flat folder."""
    monkeypatch.setattr(G, "MIN_STAGE_S", 2)
    good, _, _, hangs = fake_plan(tmp_path)
    hangs = dataclasses.replace(hangs, timeout_s=60, grace_s=0)  # killed at its (cut) timeout, no SIGINT first
    ctx = {"py": PY, "horovodrun": "horovodrun", "gpus": 1, "dir": str(tmp_path / "run")}
    os.makedirs(ctx["dir"])
    t0 = time.monotonic()
    report = G.run_plan((good, hangs, good), ctx, ctx["dir"], {"gpus": ["fake"]}, budget_s=6,
                        copy_to=str(tmp_path / "out"))
    assert time.monotonic() - t0 < 15
    stages = report["stages"]
    assert [s["name"] for s in stages] == ["good", "hangs", "good"]
    assert stages[0]["passed"] and stages[1]["timed_out"] and stages[1]["timeout_s"] < 60
    assert stages[2]["not_run"] == "not run: 6 s budget (--budget-s) spent" and not stages[2]["passed"]
    assert report["complete"] is False and report["passed"] is False
    assert sorted(os.listdir(tmp_path / "out")) == ["gpu-check-logs.txt", "gpu-check.json", "gpu-check.md"]
    md = (tmp_path / "out" / "gpu-check.md").read_text()
    assert "## good: NOT RUN (not run: 6 s budget (--budget-s) spent)" in md
    logs = (tmp_path / "out" / "gpu-check-logs.txt").read_text()
    assert "===== good:" in logs and "noise" in logs and "===== hangs:" in logs
