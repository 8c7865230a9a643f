"""Where the step time goes (hvdtrain/timing.py), on whole runs: a run built to wait for
data and a run built to compute get opposite verdicts, and a NO-GO on throughput names
the dominant cause with its share and the next thing to try."""
import json
import sys

from hvdtrain.bench.loader_runs import make_imagenet_like
from tests.e2e.harness import HOROVODRUN, TRAIN, hvd, run

QUIET = ["--run.progress=False", "--run.tensorboard=False", "--task", "classify", "--train.grad_accum_steps=1",
         "--train.log_every=4"]


def breakdown(run_dir):
    b = json.load(open(run_dir / "summary.json"))["breakdown"]
    assert abs(sum(b["shares"].values()) - 1) < 1e-6 and b["share"] == max(b["shares"].values())
    return b


def test_a_data_bound_and_a_compute_bound_run_get_opposite_verdicts(tmp_path, synth_data):
    # data-bound: one DALI thread decoding 500x375 JPEGs for a 4-channel convnet on 32 px crops; torch
    # keeps to the other core (with both, DALI would slow every op of the step and it would read compute);
    # batches of 32: the step's fixed cost (Python, autograd) is spread over more decodes
    big = make_imagenet_like(str(tmp_path / "big"), 96)
    r = run(hvd(1) + TRAIN + ["--preset", "ci", *QUIET, f"--data.train={big}", "--data.threads=1",
                              "--data.prefetch=1", "--train.torch_threads=1", "--model.width=4", "--train.batch_size=32",
                              "--train.steps=10",
                              f"--run.dir={tmp_path}/data"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    d = breakdown(tmp_path / "data")
    assert d["bound"] == "data-bound" and d["dominant"] == "data_wait", d
    assert "--data.threads" in d["next_step"] and "time    data-bound: data_wait" in r.stdout
    # compute-bound: ResNet-50 on 32 px crops of the small synthetic images, the loader warm
    r = run(hvd(1) + TRAIN + ["--preset", "ci", *QUIET, f"--data.train={synth_data}/train", "--model.name=resnet50",
                              "--model.small_stem=False", "--train.batch_size=8", "--train.steps=12",
                              f"--run.dir={tmp_path}/compute"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    c = breakdown(tmp_path / "compute")
    assert c["bound"] == "compute-bound" and c["dominant"] == "fwd_bwd", c
    print(f"data-bound run: {d['shares']}\ncompute-bound run: {c['shares']}")


def test_a_throughput_no_go_names_the_dominant_cause(tmp_path, synth_data):
    (tmp_path / "slo.json").write_text(json.dumps({"loader_img_s": 1e9}))
    r = run(HOROVODRUN + [sys.executable, "-m", "hvdtrain.sanity", "--preset", "ci", "--train.steps=6",
                          f"--data.train={synth_data}/train", f"--run.dir={tmp_path}/run",
                          f"--slo={tmp_path}/slo.json"])
    assert r.returncode == 1, (r.stdout + r.stderr)[-3000:]
    rep = json.load(open(tmp_path / "run" / "sanity.json"))
    b = rep["breakdown"]
    assert rep["verdict"] == "NO-GO" and rep["why"].startswith("loader_img_s failed; ")
    assert f"{b['dominant']} {100 * b['share']:.1f} % of step time" in rep["why"] and "next: " in rep["why"]
    assert f"verdict: NO-GO: {rep['why']}" in r.stdout
