"""The GPU node check's plan rehearsed on the CPU: gpucheck's real stages (names, order,
outputs, figures, exit marks) with each command replaced by a stand-in that takes a known
time, finishes, crashes at exit, hangs, or prints partial results when interrupted, under
a budget, with the real runner on real subprocesses. What it checks is what a user's
report on a GPU node depends on: the order, the budget cut and NOT RUN, SIGINT then the
kill (with SIGINT ignored by gpu_check's own parent, as in the background of a
non-interactive shell: a batch job or `nohup`), results kept from a timed-out stage, a
crash at exit after a clean finish, expected and unexpected skips, and the report
rewritten after every stage."""
import dataclasses
import json
import os
import signal
import sys
import time

import pytest

from gpucheck import check as G
from gpucheck.runner import EXPECTED_SKIP, REPO

PY = sys.executable

STANDIN = r'''
import json, os, signal, sys, time
sys.path.insert(0, sys.argv[1])
from hvdtrain import exitmark
mode, out = sys.argv[2], sys.argv[3]

def bench_json(doc):
    print("BENCH_JSON " + json.dumps({"error": None, **doc}), flush=True)

if mode == "quick":
    print("made", flush=True)
elif mode == "train":  # a good run, then DALI's abort at interpreter shutdown
    bench_json({"config": {"train": {"amp": "bf16"}, "data": {"channels_last": True}}, "real_over_synthetic": 0.97,
                "real": {"steady_images_per_s": 2900.0}, "synthetic": {"steady_images_per_s": 3000.0},
                "gpu": {"util_mean_pct": 96.0}, "breakdown": {"dominant": "compute", "share": 0.8, "bound": "compute"}})
    exitmark.mark(0)
    print("terminate called after throwing an instance of 'dali::CUDAError'", flush=True)
    os.abort()
elif mode == "sanity":  # writes its report; records which stages gpu-check.json held when it started
    seen = [s["name"] for s in json.load(open(os.path.join(out, "gpu-check.json")))["stages"]]
    os.makedirs(os.path.join(out, "sanity"), exist_ok=True)
    json.dump({"verdict": "GO", "slos": [{"name": "gpu_util_pct", "value": 91.0}], "seen_stages": seen,
               "gpu": {"util_mean_pct": 91.0, "dmon": {"sm_mean_pct": 88.0}, "sm_util_mean_pct": 60.0,
                       "jpg_util_mean_pct": None, "jpg_util_why": "this GPU has no JPEG engine"},
               "max_memory_gib": 1.3, "images_per_s": 5000.0, "breakdown": None},
              open(os.path.join(out, "sanity", "sanity.json"), "w"))
    sys.exit(exitmark.mark(0))
elif mode == "refuse":  # dist.init with more ranks than GPUs: rank 0 prints the refusal, every rank exits 2
    from hvdtrain.dist import GpuLayoutError, gpu_for_rank
    try:
        gpu_for_rank(1, 2, 1)
    except GpuLayoutError as e:
        print(f"hvdtrain: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
elif mode == "unexplained":  # exits as a refusal does, without saying what to run instead
    print("Process 0 exit with status code 2", flush=True)
    sys.exit(2)
elif mode == "deaf":  # prints what it has, then ignores SIGINT: only the kill ends it
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    bench_json({"interpreter": False, "copy_bw_gb_s": 3000.0, "results": [
        {"op": op, "impl": "triton", "fraction_of_copy_bw": 0.8} for op in ("normalize", "mix", "soft CE fwd+bwd")]})
    time.sleep(600)
elif mode == "sweep":  # bench.loader's way: settings one by one; SIGINT reports those measured
    results = {}
    try:
        for i in range(10000):
            results[f"dali-gpu@{i}"] = {"loader": "dali-gpu", "img_s": 8000.0 + i, "threads": i, "vs_ceiling": 0.9,
                                        "hw_decoder_load": 0.9, "gpu": {"jpg_util_mean_pct": 70.0},
                                        "rebuilds_in_windows": 0}
            time.sleep(0.5)
    except KeyboardInterrupt:
        bench_json({"results": results, "error": f"interrupted (SIGINT) after {len(results)} settings"})
        sys.exit(exitmark.mark(1))
'''

TESTS = f'''
import time, pytest
def test_passes(): pass
def test_one_gpu(): pytest.skip("{EXPECTED_SKIP} one GPU: there is no other order")
def test_no_tool(): pytest.skip("no nvidia-smi on PATH")
def test_hangs(): time.sleep(600)
'''

# stand-in, timeout and grace per stage: train-data and loader-data finish at once; train
# crashes at exit after a clean finish; sanity reads the report written so far; kernels
# ignores SIGINT and is killed at its timeout; gpu-tests is real pytest with a hanging
# test (SIGINT at 16 s); loader-224 sweeps until the budget's SIGINT;
# two-ranks refuses as dist.init does; the rooms and loader-64: no time left.
PLAN = {"train-data": ("quick", 10, 2), "train": ("train", 10, 2), "sanity": ("sanity", 10, 2),
        "two-ranks": ("refuse", 10, 2), "kernels": ("deaf", 4, 1), "gpu-tests": ("pytest", 20, 4),
        "loader-data": ("quick", 10, 2), "loader-224": ("sweep", 300, 2), "unit-tests": ("quick", 10, 2),
        "parallel-tests": ("quick", 10, 2), "loader-64": ("sweep", 300, 2)}
BUDGET_S = 50


def standin_plan(tmp_path) -> tuple:
    script, tests = tmp_path / "standin.py", tmp_path / "test_standin.py"
    script.write_text(STANDIN)
    tests.write_text(TESTS)
    out = []
    for s in G.STAGES:
        mode, timeout_s, grace_s = PLAN[s.name]
        argv = (("{py}", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--junitxml={dir}/gpu-tests.xml", str(tests))
                if mode == "pytest" else ("{py}", str(script), REPO, mode, "{dir}"))
        out.append(dataclasses.replace(s, argv=argv, timeout_s=timeout_s, grace_s=grace_s))
    return tuple(out)


@pytest.fixture
def sigint_ignored():
    """gpu_check's parent ignores SIGINT (a background job of a non-interactive shell):
    its stages inherit that unless the runner puts SIGINT back for them."""
    old = signal.signal(signal.SIGINT, signal.SIG_IGN)
    yield
    signal.signal(signal.SIGINT, old)


def test_the_real_plan_is_sized_and_ordered():
    names = [s.name for s in G.STAGES]
    assert names[:2] == ["train-data", "train"] and names[-1] == "loader-64", names
    assert names.index("loader-data") < names.index("loader-224")
    assert all(s.cost for s in G.STAGES), [s.name for s in G.STAGES if not s.cost]
    # every stage with a target of its own, through the 224 px sweep, ends within 570 s (a
    # ten-minute --budget-s judges every target); the CPU rooms run on the node and the
    # 64 px sweep take what the budget leaves
    core = names.index("loader-224") + 1
    assert sum(s.timeout_s for s in G.STAGES[:core]) <= 570
    assert names[core:] == ["unit-tests", "parallel-tests", "loader-64"], names


def test_the_plan_rehearsed_with_stand_ins_under_a_budget(tmp_path, monkeypatch, sigint_ignored):
    monkeypatch.setattr(G, "MIN_STAGE_S", 5)
    run_dir, copy_to = tmp_path / "run", tmp_path / "out"
    run_dir.mkdir()
    ctx = {"py": PY, "horovodrun": "horovodrun", "gpus": 1, "dir": str(run_dir), "gpu_name": "NVIDIA H200"}
    t0 = time.monotonic()
    report = G.run_plan(standin_plan(tmp_path), ctx, str(run_dir), {"gpus": ["stand-in"]}, budget_s=BUDGET_S,
                        copy_to=str(copy_to))
    wall_s = time.monotonic() - t0
    assert wall_s < BUDGET_S + 5, f"the plan took {wall_s:.0f} s of a {BUDGET_S} s budget"
    stages = {s["name"]: s for s in report["stages"]}
    figs = {f["key"]: f for s in report["stages"] for f in s["figures"]}
    assert [s["name"] for s in report["stages"]] == [s.name for s in G.STAGES]  # the plan's order

    # a crash at exit after every process said EXIT_STATUS 0: the results stand, the crash is named
    assert stages["train"]["passed"] and stages["train"]["exit"] != 0
    assert "crashed at exit (killed by SIGABRT)" in figs["train.exit"]["why"] and "dali::CUDAError" in \
        figs["train.exit"]["why"]
    assert figs["train_real_over_synthetic"]["status"] == "PASS"
    # the report was on disk before the next stage began
    seen = json.loads((run_dir / "sanity" / "sanity.json").read_text())["seen_stages"]
    assert seen == ["train-data", "train"] and stages["sanity"]["passed"]
    assert figs["sanity_jpeg_engines_util_pct"]["status"] == "NOT EVALUATED" and \
        figs["sanity_jpeg_engines_util_pct"]["why"] == "this GPU has no JPEG engine"  # a reason, and no target
    # more ranks than GPUs: a refusal that says what to run instead is the stage's clean end
    assert stages["two-ranks"]["passed"] and stages["two-ranks"]["exit"] == 2, stages["two-ranks"]
    assert figs["two-ranks.exit"]["why"].startswith("refused as designed (exit status 2): hvdtrain: 2 ranks")
    assert figs["two_ranks_refused"]["status"] == "PASS" and figs["two_ranks_wall_s"]["status"] == "PASS"
    assert "CUDA_VISIBLE_DEVICES= horovodrun -np 2" in figs["two_ranks_outcome"]["value"]
    # SIGINT ignored: killed at the timeout, with what it printed before kept
    assert stages["kernels"]["timed_out"] and stages["kernels"]["ended_by"] == "SIGKILL"
    assert 4 <= stages["kernels"]["wall_s"] < 6 and figs["kernels_compiled"]["status"] == "PASS"
    assert "SIGINT did not end it" in figs["kernels.exit"]["why"] and not stages["kernels"]["passed"]
    # pytest interrupted: its JUnit XML has the tests that ran; an expected skip does not fail, another does
    t = stages["gpu-tests"]
    assert t["timed_out"] and t["ended_by"] == "SIGINT" and 15 <= t["wall_s"] < 20
    assert figs["gpu_tests_passed"]["value"] == 1 and figs["gpu_tests_failed"]["status"] == "PASS"
    assert figs["gpu_tests_unexpected_skips"]["value"] == 1 and figs["gpu_tests_unexpected_skips"]["status"] == "FAIL"
    assert figs["gpu_tests_expected_skips"]["value"].startswith("1: ") and "one GPU" in \
        figs["gpu_tests_expected_skips"]["value"]
    assert "no nvidia-smi" in figs["gpu_tests_not_passed"]["value"]
    # the budget cut the sweep's timeout; SIGINT got its partial results; nothing left for the last stages
    sweep = stages["loader-224"]
    assert sweep["timed_out"] and sweep["ended_by"] == "SIGINT" and sweep["timeout_s"] < 300
    assert figs["loader_224_dali_gpu_img_s"]["value"] >= 8000 and figs["loader_224_dali_gpu_img_s"]["status"] == "PASS"
    assert "interrupted (SIGINT)" in figs["loader_224_errors"]["value"]
    for late in ("unit-tests", "parallel-tests", "loader-64"):
        assert stages[late]["not_run"] == f"not run: {BUDGET_S} s budget (--budget-s) spent", late
    assert report["complete"] is False and report["passed"] is False and report["pending"] == []
    failed = ["kernels", "gpu-tests", "loader-224", "unit-tests", "parallel-tests", "loader-64"]
    assert report["failed_stages"] == failed
    # the flat copy (--copy-to) a user reads while the check runs or after
    md = (copy_to / "gpu-check.md").read_text()
    assert md.startswith(f"# gpu-check: FAIL: {', '.join(failed)} (incomplete")
    assert "## loader-64: NOT RUN" in md and "timed out: ended by SIGINT" in md
    assert json.loads((copy_to / "gpu-check.json").read_text())["stages"][-1]["name"] == "loader-64"
    assert "===== gpu-tests:" in (copy_to / "gpu-check-logs.txt").read_text()


ROOM = f'''
import pytest
def test_passes(): pass
def test_differs_here(): assert 1 == 2, "only on this machine"
def test_skipped(): pytest.skip("no such tool here")
'''


def test_the_refusal_and_the_rooms_judged(tmp_path):
    """two-ranks: a non-zero exit that does not say what to run instead fails, named. The
    unit room: a failure and a skip are listed as behaving differently on that machine. The
    parallel room as the plan runs it (the real tests/parallel, one test, 2 Horovod ranks,
    GPUs hidden): each rank writes its own JUnit XML and both are read."""
    from gpucheck.runner import run_stage

    stage = {s.name: s for s in G.STAGES}
    script, room = tmp_path / "standin.py", tmp_path / "test_room.py"
    script.write_text(STANDIN)
    room.write_text(ROOM)
    ctx = {"py": PY, "horovodrun": os.path.join(os.path.dirname(PY), "horovodrun"), "gpus": 1, "dir": str(tmp_path)}

    unexplained = run_stage(dataclasses.replace(stage["two-ranks"],
                                                argv=("{py}", str(script), REPO, "unexplained", "{dir}")),
                            ctx, str(tmp_path))
    figs = {f["key"]: f for f in unexplained["figures"]}
    assert not unexplained["passed"] and not unexplained["refused"] and figs["two-ranks.exit"]["status"] == "FAIL"
    assert figs["two_ranks_refused"]["status"] == "FAIL"
    assert figs["two_ranks_outcome"]["value"] == "exit 2 without saying what to run instead"

    unit = run_stage(dataclasses.replace(stage["unit-tests"], argv=stage["unit-tests"].argv[:-1] + (str(room),)),
                     ctx, str(tmp_path))
    figs = {f["key"]: f for f in unit["figures"]}
    assert figs["unit_tests_failed"]["value"] == 1 and figs["unit_tests_failed"]["status"] == "FAIL"
    assert figs["unit_tests_passed"]["value"] == 1
    different = figs["unit_tests_different_here"]["value"]
    assert different.startswith("2: ") and "test_differs_here" in different and "no such tool here" in different

    (tmp_path / "parallel-tests.rank7.xml").write_text("<testsuite/>")  # an earlier run's: removed, not read
    quick = "test_world_is_two_ranks"
    par = run_stage(dataclasses.replace(stage["parallel-tests"], argv=stage["parallel-tests"].argv + ("-k", quick)),
                    ctx, str(tmp_path))
    figs = {f["key"]: f for f in par["figures"]}
    assert par["passed"], open(par["log"]).read()[-3000:]
    assert sorted(p.name for p in tmp_path.glob("parallel-tests*.xml")) == \
        ["parallel-tests.rank0.xml", "parallel-tests.rank1.xml"]
    assert figs["parallel_tests_ranks_reported"]["value"] == 2 and figs["parallel_tests_passed"]["value"] == 2
    assert figs["parallel_tests_different_here"]["value"] == "none"
