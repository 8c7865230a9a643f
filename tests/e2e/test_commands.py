"""Whole commands as a user types them: real horovodrun with 2 processes, real shards.
Every command runs under a timeout that fails the test instead of hanging CI."""
import json
import math
import os
import sys

import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import jpeg
from tests.e2e.harness import HOROVODRUN, run


def test_sanity_ci_preset_two_ranks_writes_a_complete_report(tmp_path, synth_data):
    r = run(HOROVODRUN + [sys.executable, "-m", "hvdtrain.sanity", "--preset", "ci",
                          f"--data.train={synth_data}/train", f"--run.dir={tmp_path}/run"])
    out = r.stdout + r.stderr
    assert r.returncode == 0, out[-3000:]  # the ci preset on the synthetic set is a GO on this machine
    rep = json.load(open(tmp_path / "run" / "sanity.json"))
    for key in ("verdict", "config", "git_sha", "loss_first10", "loss_last10", "loss_reduction",
                "wall_time_s", "images_per_s", "slos"):
        assert key in rep, key
    assert rep["ranks"] == 2 and rep["config"]["preset"] == "ci"
    assert len(rep["git_sha"]) == 40 and rep["data"]["train"]["samples"] == 256
    assert rep["loss_reduction"] == pytest.approx(rep["loss_first10"] - rep["loss_last10"])
    slos = {s["name"]: s for s in rep["slos"]}
    assert set(slos) == {"loader_img_s", "loss_reduction", "sanity_time_min", "gpu_util_pct"}
    assert slos["gpu_util_pct"]["passed"] is None and slos["gpu_util_pct"]["value"] is None  # no GPU here
    assert rep["verdict"] == "GO" and all(s["passed"] is not False for s in rep["slos"])
    assert len(rep["loss_per_step"]) == 40 and all(math.isfinite(x) for x in rep["loss_per_step"])
    assert rep["breakdown"]["dominant"] in rep["breakdown"]["shares"] and rep["why"] is None
    assert sum(rep["breakdown"]["shares"].values()) == pytest.approx(1.0)
    md = (tmp_path / "run" / "sanity.md").read_text()
    assert rep["git_sha"] in md and "NOT EVALUATED" in md and f"{rep['loss_first10']:.4f}" in md
    with Image.open(tmp_path / "run" / "loss.png") as png:  # a real picture, not just a file
        assert png.format == "PNG" and png.size[0] > 300 and png.size[1] > 200
    assert f"verdict: {rep['verdict']}" in r.stdout and "step time" in r.stdout
    # a sanity run is a training run: its metrics and summary sit beside the report
    metrics = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == list(range(2, 41, 2))
    assert json.load(open(tmp_path / "run" / "summary.json"))["steps"] == 40


def test_sanity_impossible_slo_is_no_go_with_exit_1(tmp_path, synth_data):
    (tmp_path / "slo.json").write_text(json.dumps({"loss_reduction": 100}))
    r = run(HOROVODRUN + [sys.executable, "-m", "hvdtrain.sanity", "--preset", "ci", "--train.steps=4",
                          f"--data.train={synth_data}/train", f"--run.dir={tmp_path}/run",
                          f"--slo={tmp_path}/slo.json"])
    assert r.returncode != 0
    rep = json.load(open(tmp_path / "run" / "sanity.json"))
    assert rep["verdict"] == "NO-GO" and "verdict: NO-GO" in r.stdout


def test_shardwriter_shards_train_with_two_ranks(tmp_path):
    """Shards from webdataset's own ShardWriter: text .cls, no index, no _info.json."""
    with wds.ShardWriter(str(tmp_path / "ext-%06d.tar"), maxcount=40) as sink:
        for i in range(96):
            sink.write({"__key__": f"k{i:05d}", "jpg": jpeg(i), "cls": str(i % 3)})
    r = run(HOROVODRUN + [sys.executable, "-m", "hvdtrain.train", "--preset", "ci", "--train.steps=3",
                          f"--data.train={tmp_path}/ext-{{000000..000002}}.tar", f"--run.dir={tmp_path}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "done: step 3," in r.stdout and "fingerprint q" in r.stdout
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert lines[-1]["step"] == 3 and all(math.isfinite(x["train_loss"]) for x in lines)
    assert json.load(open(tmp_path / "run" / "config.json"))["data"]["train"]["shards"] == 3


def test_the_torch_loader_trains_behind_the_same_loop(tmp_path, synth_data):
    r = run(HOROVODRUN + [sys.executable, "-m", "hvdtrain.train", "--preset", "ci", "--task", "classify",
                          "--data.loader=torch", "--train.steps=4", "--train.log_every=1",
                          f"--data.train={synth_data}/train", f"--data.val={synth_data}/val", f"--run.dir={tmp_path}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "input   torch DataLoader + PIL, 1 worker(s)" in r.stdout
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in recs if "train_loss" in x] == [1, 2, 3, 4]
    assert [x["val_samples"] for x in recs if "val_loss" in x] == [64]  # every val sample once over 2 ranks


def test_bad_data_path_and_bad_key_fail_clearly(tmp_path):
    r = run([sys.executable, "-m", "hvdtrain.sanity", "--train.stepz=3"], timeout=120)
    assert r.returncode == 2 and "unknown config key --train.stepz" in r.stderr
    r = run(HOROVODRUN + [sys.executable, "-m", "hvdtrain.sanity", "--preset", "ci",
                          f"--data.train={tmp_path}/none-{{000..001}}.tar"])
    assert r.returncode != 0 and "2 of 2 shard(s) missing" in r.stdout + r.stderr


def test_synth_cli(tmp_path):
    r = run([sys.executable, "-m", "data.synth", str(tmp_path), "--classes", "3", "--train", "30",
             "--val", "9", "--size", "32", "--seed", "1", "--shard-size", "20"], timeout=120)
    assert r.returncode == 0, r.stderr
    info = json.load(open(tmp_path / "train" / "_info.json"))
    assert info["total"] == 30 and info["num_classes"] == 3 and len(info["shards"]) == 2
    assert json.load(open(tmp_path / "val" / "_info.json"))["total"] == 9


def test_bench_loader_prints_table_and_bench_json_last(tmp_path, synth_data):
    r = run([sys.executable, "-m", "bench.loader", "--data", f"{synth_data}/train", "--size", "32",
             "--batch-size", "16", "--threads", "1", "--workers", "1", "--windows", "5",
             "--window-batches", "3", "--warmup", "2", "--run-dir", str(tmp_path)], timeout=300)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.startswith("BENCH_JSON ")
    j = json.loads(last[len("BENCH_JSON "):])
    res = j["results"]
    assert res["dali-cpu"]["img_s"] > 0 and res["torch"]["img_s"] > 0 and res["ceiling-cpu"]["img_s"] > 0
    assert res["dali-gpu"]["skipped"] == "no GPU" and res["ceiling-gpu"]["skipped"] == "no GPU"
    # the ceiling bounds what it is compared with (error would name the loader above it)
    assert j["error"] is None and 0 < res["dali-cpu"]["vs_ceiling"] <= 1.05 and 0 < res["torch"]["vs_ceiling"] <= 1.05
    assert res["dali-cpu"]["cpu_cores_used"] > 0
    # --data.loader=synthetic's loader: no reader, so far above any loader that decodes
    assert res["synthetic"]["img_s"] > 10 * res["dali-cpu"]["img_s"] and res["synthetic"].get("ceiling_key") is None
    assert j["slos"][0]["name"] == "loader_img_s" and len(j["git_sha"]) == 40
    assert "dali-cpu" in r.stdout and "vs ceiling" in r.stdout
    assert "| dali-cpu | 1 |" in (tmp_path / "bench-loader.md").read_text()


def test_bench_loader_tune_prints_overrides_within_its_budget(tmp_path, synth_data):
    import time
    t0 = time.monotonic()
    r = run([sys.executable, "-m", "bench.loader", "--data", f"{synth_data}/train", "--size", "32", "--batch-size", "16",
             "--window-batches", "2", "--warmup", "1", "--tune", "--tune-seconds", "15", "--run-dir", str(tmp_path)],
            timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    j = json.loads(r.stdout.strip().splitlines()[-1][len("BENCH_JSON "):])
    best, tried = j["best"], j["trials"]
    assert {(t["knob"], t["threads"], t["prefetch"]) for t in tried} >= {("threads", 1, 2), ("threads", 2, 2)}
    top = max(t["img_s"] for t in tried)  # the cheapest of the trials within 3 % of the fastest
    assert best["img_s"] >= 0.97 * top
    assert best["cpu_cores_used"] == min(t["cpu_cores_used"] for t in tried if t["img_s"] >= 0.97 * top)
    assert j["overrides"] == f"--data.threads={best['threads']} --data.prefetch={best['prefetch']}"
    assert f"paste: {j['overrides']}" in r.stdout
    assert j["seconds"] < 15 + 30 and took < 120  # the budget holds, give or take the trial it ends in


@pytest.mark.parametrize("backend", ["ref", "triton"])
def test_classify_with_mixup_and_cutmix_two_ranks(tmp_path, synth_data, backend):
    """The kernels in the training path: torch reference (the CPU default) and the Triton
    kernels forced through the interpreter."""
    env = {**os.environ, "HVDTRAIN_KERNELS": backend, "TRITON_INTERPRET": "1"}
    r = run(HOROVODRUN + [sys.executable, "-m", "hvdtrain.train", "--preset", "ci", "--train.task=classify",
                          "--train.steps=4", "--aug.mixup=0.4", "--aug.cutmix=1.0", "--aug.label_smoothing=0.1",
                          "--data.normalize=kernel",  # the normalize kernel too (auto picks DALI's on a CPU-only machine)
                          f"--data.train={synth_data}/train", f"--run.dir={tmp_path}/run"], env=env)
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    want = "triton (interpreter)" if backend == "triton" else "torch reference"
    assert f"normalize kernel, mixup 0.4, cutmix 1.0; kernels: {want}" in r.stdout
    losses = [json.loads(x)["train_loss"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 2 and all(0 < v < 10 for v in losses)


def test_bench_kernels_runs_and_labels_interpreter_times():
    r = run([sys.executable, "-m", "bench.kernels", "--repeats", "1"], timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    j = json.loads(r.stdout.strip().splitlines()[-1][len("BENCH_JSON "):])
    impls = {(x["op"], x["impl"]) for x in j["results"]}
    for op in ("normalize", "mix", "soft CE fwd+bwd"):
        assert (op, "torch ref" if op != "normalize" else "torch ref (uint8 in)") in impls
        assert (op, "triton (interpreter)") in impls
    assert j["interpreter"] is True and "interpreter times are not speeds" in r.stdout


def test_bench_allreduce_two_ranks(tmp_path):
    r = run(HOROVODRUN + [sys.executable, "-m", "bench.allreduce", "--max-mib", "1", "--repeats", "2",
                          "--run-dir", str(tmp_path)])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    j = json.load(open(tmp_path / "bench-allreduce.json"))
    assert j["ranks"] == 2 and [x["bytes"] for x in j["results"] if not x["fp16"]] == [4096, 16384, 65536, 262144, 1048576]
    for x in j["results"]:
        assert x["time_ms"] > 0 and x["busbw_gb_s"] == pytest.approx(x["algbw_gb_s"])  # 2(n-1)/n = 1 at n=2
    md = (tmp_path / "bench-allreduce.md").read_text()
    assert all(f"{x['time_ms']:.3f}" in md for x in j["results"])  # the table's figures are the JSON's
    with Image.open(tmp_path / "bench-allreduce.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    assert r.stdout.strip().splitlines()[-1].split(":", 1)[-1].startswith("BENCH_JSON ")


def test_bench_train_real_vs_synthetic_two_ranks(tmp_path, synth_data):
    r = run(HOROVODRUN + [sys.executable, "-m", "bench.throughput", "--preset", "ci", "--train.steps=3", "--warmup=1",
                          f"--data.train={synth_data}/train", f"--run-dir={tmp_path}"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    j = json.load(open(tmp_path / "bench-train.json"))
    assert j["ranks"] == 2 and j["real"]["images"] == 2 * 3 * 8 * 2  # ranks x steps x batch x accum
    assert all(0 <= j[k]["data_wait_share"] <= 1 for k in ("real", "synthetic"))  # shares, not timings to judge
    assert j["real_over_synthetic"] == pytest.approx(j["real"]["steady_images_per_s"] / j["synthetic"]["steady_images_per_s"])
    assert "loader overhead ratio real/synthetic" in r.stdout and "NOT EVALUATED (no GPU)" in r.stdout
    assert "synthetic, no reader" in r.stdout and j["data"]["train"]["samples"] == 256  # the real row read shards
    assert j["slos"][0]["name"] == "gpu_util_pct" and j["slos"][0]["passed"] is None
    assert j["breakdown"]["bound"].endswith("-bound") and "step time (real)" in r.stdout
    with Image.open(tmp_path / "bench-train.png") as png:
        assert png.format == "PNG" and png.size[0] > 300
    assert f"{j['real_over_synthetic']:.3f}" in (tmp_path / "bench-train.md").read_text()
