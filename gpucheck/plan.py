"""gpucheck's plan: the commands, their targets, how each figure is read from a
command's output, and the stages in the order they run (gpucheck/check.py runs them with
gpucheck/runner.py). A flag, a target or a timeout changes here; docs/gpu-check.md's
table of stages follows this file."""
from __future__ import annotations

from gpucheck.runner import Figure, Stage

# ---------------------------------------------------------------- the commands, in one place
# A flag that changes in a module is a one-line fix here; tests/e2e/test_gpu_check.py's
# dry run fails first (it runs each module's own parser on these flags).
# 3 x 4 dali-gpu settings, each beside its ceiling, + dali-cpu, torch, pil: 3 timed windows each
LOADER_SWEEP = ("--loader", "all", "--threads", "4,8,16", "--hw-decoder-load", "0,0.65,0.9,0.99", "--windows", "3")
# 64 px: decode dominates as at 224 (the same 500x375 JPEGs), so the full sweep would cost
# as much again for figures with no target: dali-gpu at 2 x 2 settings, beside their ceilings
LOADER_SWEEP_64 = ("--loader", "dali-gpu", "--threads", "8,16", "--hw-decoder-load", "0.65,0.99", "--windows", "3")
COMMANDS: dict[str, tuple[str, ...]] = {
    # ImageNet-like 256 px JPEGs for bench.throughput: 8192 take ~15 s on one core
    "train-data": ("{py}", "-m", "data.synth", "{dir}/train-data", "--classes", "100", "--train", "8192",
                   "--val", "256", "--size", "256", "--seed", "1"),
    "train": ("{horovodrun}", "--gloo", "-np", "1", "-H", "localhost:1", "{py}", "-m", "bench.throughput", "--preset", "resnet50",
              "--train.amp=bf16", "--data.channels_last=True", "--data.train={dir}/train-data/train",
              "--train.steps=20", "--warmup=3", "--run-dir={dir}/train"),
    "sanity": ("{horovodrun}", "--gloo", "-np", "{gpus}", "-H", "localhost:{gpus}", "{py}", "-m", "hvdtrain.sanity",
               "--run.dir={dir}/sanity"),
    "kernels": ("{py}", "-m", "bench.kernels"),
    # one rank more than the GPUs (on a one-GPU node: `horovodrun -np 2 python -m
    # hvdtrain.sanity`, a likely first command there). It must stop at once saying what to
    # run instead (hvdtrain.dist.gpu_for_rank), never hang
    "two-ranks": ("{horovodrun}", "-np", "{gpus+1}", "{py}", "-m", "hvdtrain.sanity", "--run.dir={dir}/two-ranks"),
    "gpu-tests": ("{py}", "-m", "pytest", "-q", "-rs", "--strict-markers", "-m", "gpu", "-p", "no:cacheprovider",
                  "--junitxml={dir}/gpu-tests.xml", "tests/gpu"),
    # bench.loader's 500x375 JPEGs, made once for both loader stages (made by each
    # bench.loader run, they would cost each of them ~20 s)
    "loader-data": ("{py}", "-m", "bench.loader", "--make-data", "{dir}/loader-data", "--images", "1024"),
    "loader-224": ("{py}", "-m", "bench.loader", "--data", "{dir}/loader-data", *LOADER_SWEEP, "--size", "224",
                   "--run-dir", "{dir}/loader-224"),
    "loader-64": ("{py}", "-m", "bench.loader", "--data", "{dir}/loader-data", *LOADER_SWEEP_64, "--size", "64",
                  "--run-dir", "{dir}/loader-64"),
    # `make test`'s first two rooms on this node (a CPU machine runs them in every CI)
    "unit-tests": ("{py}", "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--junitxml={dir}/unit-tests.xml",
                   "tests/unit"),
    # as `make test-parallel` runs it: the GPUs hidden (the env in STAGES); one JUnit file per rank
    "parallel-tests": ("{horovodrun}", "--gloo", "-np", "2", "-H", "localhost:2", "{py}", "-m", "pytest", "-q", "-x",
                       "-rs", "-p", "no:cacheprovider", "--junitxml={dir}/parallel-tests.xml", "tests/parallel"),
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
    """The training step-time breakdown's verdict, e.g. 'data_wait 62% (data-bound)'."""
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


def room_figures(key: str, room: str, ranks: int = 1) -> tuple[Figure, ...]:
    """A CPU room run on the GPU node: on a CPU machine it passes whole in every CI, so
    any failure, error or skip here is a test that behaves differently on this node."""
    return (
        Figure(f"{key}_failed", f"{room}: failed or errored", lambda d: d["failures"] + d["errors"], "==", 0),
        Figure(f"{key}_passed", f"{room}: passed" + (f" (summed over {ranks} ranks)" if ranks > 1 else ""),
               lambda d: d["passed"], ">=", 1),
        *((Figure(f"{key}_ranks_reported", f"{room}: ranks that wrote their JUnit XML", lambda d: d["files"], "==",
                  ranks),) if ranks > 1 else ()),
        Figure(f"{key}_different_here", f"{room}: tests that failed or skipped here (none on a CPU machine)",
               lambda d: listed(d["not_passed"] + d["expected_skips"] + d["unexpected_skips"])),
    )


# the refusal hvdtrain.dist.gpu_for_rank prints: the layout, and the command to run instead
LAYOUT_REFUSAL = r"hvdtrain runs one rank per GPU\. Run `horovodrun -np \d+"


def two_ranks_outcome(d: dict) -> str:
    """How the two-ranks stage ended (its `ended` document: exit, wall_s, refused)."""
    if d["exit"] == 0:
        return "ran (exit 0): the one-rank-per-GPU check let a rank share a GPU"
    if d["refused"]:
        return f"refused (exit {d['exit']}): {d['refused']}"
    return "timed out" if d["exit"] is None else f"exit {d['exit']} without saying what to run instead"


# In the order of what a stage's figures are worth per second, since a budget cut
# (--budget-s) falls on the last stages. `cost`: what each timeout is sized from;
# "reasoned" costs are estimates for one H100/H200 node with 16 cores, each timeout about
# 1.5-2x its cost. The stages with a target of their own (train-data through loader-224)
# end within 570 s even if each runs to its timeout, so a check given ten minutes
# (`--budget-s 600`) judges every target; the CPU rooms and the 64 px sweep take what is
# left. A stage the budget cut runs later with `--only NAME --out <the same folder>`.
STAGES: tuple[Stage, ...] = (
    Stage("train-data", COMMANDS["train-data"], 30, "none",
          cost="measured: 8192 JPEGs at 256 px in ~15 s on one core of a 2-core CPU machine"),
    Stage("train", COMMANDS["train"], 75, "bench_json", (
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
    Stage("sanity", COMMANDS["sanity"], 80, "json:{dir}/sanity/sanity.json", (
        Figure("sanity_verdict", "sanity verdict", lambda d: d["verdict"], "==", "GO"),
        Figure("sanity_gpu_util_pct", "GPU utilisation, NVML mean (rank 0's GPU)",
               lambda d: sanity_slo(d, "gpu_util_pct"), ">=", 85.0,
               why=lambda d: sanity_slo(d, "gpu_util_pct", "not_evaluated")),
        Figure("sanity_dmon_gap_pct", "NVML vs nvidia-smi dmon utilisation, points apart", dmon_gap, "<=", 10.0,
               why=lambda d: d["gpu"].get("why") or (d["gpu"].get("dmon") or {}).get("why")),
        Figure("sanity_sm_util_pct", "SM utilisation, NVML GPM mean", lambda d: d["gpu"].get("sm_util_mean_pct"),
               why=lambda d: d["gpu"].get("sm_util_why")),
        Figure("sanity_jpeg_engines_util_pct", "JPEG engines' load, NVML mean (hardware decoder)",
               lambda d: d["gpu"].get("jpg_util_mean_pct"), why=lambda d: d["gpu"].get("jpg_util_why")),
        Figure("sanity_max_vram_gib", "max VRAM, GiB (torch max allocated, rank 0)", lambda d: d["max_memory_gib"]),
        Figure("sanity_img_s", "sanity training img/s, all ranks", lambda d: d["images_per_s"]),
        Figure("sanity_dominant_phase", "where the step time went (largest share)", lambda d: dominant(d["breakdown"])),
    ), exit_marks="{gpus}", cost="reasoned, ~45 s: the embedded data set (5,120 JPEGs at 64 px) ~5 s, start ~15 s, "
                                 "1,600 micro-batches of 16 at a few ms each (launch-bound)"),
    Stage("two-ranks", COMMANDS["two-ranks"], 45, "ended", (
        Figure("two_ranks_refused", "a rank more than GPUs: stopped, saying what to run instead",
               lambda d: two_ranks_outcome(d).startswith("refused"), "==", True),
        Figure("two_ranks_outcome", "how it ended", two_ranks_outcome),
        Figure("two_ranks_wall_s", "seconds until every rank had ended (at once: no hang)", lambda d: d["wall_s"],
               "<=", 30.0),
    ), refusal=LAYOUT_REFUSAL,
        cost="measured: a 2-rank horovodrun (its MPI probe included) to dist.init and exit in 6.4 s on a "
             "2-core CPU machine; on a GPU node CUDA's start is added"),
    Stage("kernels", COMMANDS["kernels"], 40, "bench_json", (
        Figure("kernels_compiled", "Triton kernels compiled, not interpreted", lambda d: d["interpreter"], "==", False),
        Figure("kernels_copy_bw_gb_s", "device copy bandwidth, GB/s (read + write)", lambda d: d["copy_bw_gb_s"]),
        *(Figure(f"kernels_{key}_of_copy_bw", f"{op}: Triton, fraction of copy bandwidth",
                 lambda d, op=op: next(r["fraction_of_copy_bw"] for r in d["results"]
                                       if r["op"] == op and r["impl"].startswith("triton")))
          for key, op in (("normalize", "normalize"), ("mix", "mix"), ("soft_ce", "soft CE fwd+bwd"))),
    ), exit_marks="1", cost="reasoned, ~20 s: torch and CUDA start ~8 s, three Triton compiles ~2 s each, timing"),
    Stage("gpu-tests", COMMANDS["gpu-tests"], 120, "junit:{dir}/gpu-tests.xml", TEST_FIGURES,
          env={"HVDTRAIN_REQUIRE_GPU": "1"}, dry="collect", grace_s=15,
          cost="reasoned, ~90 s: 37 tests; 2 subprocesses with CUDA start and 3 s of matmuls, ~12 DALI pipelines, "
               "Triton compiles for 6 normalize variants; on a timeout SIGINT keeps the tests that ran"),
    Stage("loader-data", COMMANDS["loader-data"], 40, "none",
          cost="measured: 1,024 JPEGs of 500x375 in ~20 s on one core of a 2-core CPU machine"),
    Stage("loader-224", COMMANDS["loader-224"], 130, "bench_json", loader_figures(224, True), exit_marks="1",
          grace_s=15, cost="reasoned, ~90 s: 34 settings; a GPU one ~1.5 s (build + 1,792 images), a CPU one 3-12 s; "
                           "on a timeout SIGINT keeps the settings measured"),
    Stage("unit-tests", COMMANDS["unit-tests"], 90, "junit:{dir}/unit-tests.xml",
          room_figures("unit_tests", "tests/unit"),
          dry="collect", grace_s=15,
          cost="measured: 184 tests in ~40 s on a 2-core CPU machine (kernels interpreted); on a GPU node "
               "the kernel tests compile Triton for the GPU instead, ~12 compiles of 1-2 s; SIGINT keeps the "
               "tests that ran"),
    Stage("parallel-tests", COMMANDS["parallel-tests"], 60, "junit:{dir}/parallel-tests.rank*.xml",
          room_figures("parallel_tests", "tests/parallel", ranks=2), env={"CUDA_VISIBLE_DEVICES": ""},
          dry="collect", grace_s=10, cost="measured: 2 x 16 tests in 16 s on a 2-core CPU machine, launch included"),
    Stage("loader-64", COMMANDS["loader-64"], 45, "bench_json", loader_figures(64, False, cpu_loaders=False),
          exit_marks="1", cost="reasoned, ~25 s: 8 GPU settings of ~1.5 s, start ~10 s"),
)
