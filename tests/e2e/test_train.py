"""`python -m hvdtrain.train` as users run it, under real horovodrun on real shards:
equality across process counts, kill -9 and exact resume, and every guard that
refuses or stops a run (each test checks the message)."""
import json
import math
import os
import subprocess

import pytest

from hvdtrain.data.wds import Sample, write_split
from tests.conftest import ROOT, jpeg
from tests.e2e.harness import CI, HOROVODRUN, TRAIN, exit_code, hvd, kill_job, losses, run, wait_for

# ---------------------------------------------------------------- np=1 x accum 2 == np=2 x accum 1
def test_np1_accum2_equals_np2_accum1(tmp_path):
    """Same global batch (16) and seed, GroupNorm convnet, no shuffle, no augmentation.
    DALI gives rank r the r-th contiguous half of the samples, so the np=2 shards hold the
    same global batches in the order that puts micro-batch r of step s on rank r."""
    steps, b = 20, 8
    n = steps * 2 * b
    samples = [Sample(f"s{i:05d}", jpeg(i, 40), i % 10) for i in range(n)]
    order2 = [samples[16 * s + 8 * r + j] for r in range(2) for s in range(steps) for j in range(b)]
    classes = [str(c) for c in range(10)]
    write_split(iter(samples), str(tmp_path / "np1"), classes, "train", 100)
    write_split(iter(order2), str(tmp_path / "np2"), classes, "train", 100)
    common = CI + ["--data.shuffle=False", "--data.augment=False", f"--train.batch_size={b}",
                   f"--train.steps={steps}", "--train.log_every=1"]
    r1 = run(hvd(1) + TRAIN + common + ["--train.grad_accum_steps=2", f"--data.train={tmp_path}/np1",
                                       f"--run.dir={tmp_path}/run1"])
    assert r1.returncode == 0, (r1.stdout + r1.stderr)[-3000:]
    r2 = run(hvd(2) + TRAIN + common + ["--train.grad_accum_steps=1", f"--data.train={tmp_path}/np2",
                                       f"--run.dir={tmp_path}/run2"])
    assert r2.returncode == 0, (r2.stdout + r2.stderr)[-3000:]
    a, c = losses(tmp_path / "run1"), losses(tmp_path / "run2")
    assert sorted(a) == sorted(c) == list(range(1, steps + 1))
    worst = max(abs(c[s] - a[s]) / abs(a[s]) for s in a)
    print(f"np=1 x accum 2 vs np=2 x accum 1: {steps} steps, worst relative loss difference {worst:.2e}")
    for s in a:
        assert c[s] == pytest.approx(a[s], rel=1e-4, abs=1e-5), (s, a[s], c[s])
    assert a[steps] < a[1]  # it trained, so the equality is not two frozen models


# ---------------------------------------------------------------- kill -9, then --resume auto
@pytest.mark.parametrize("interleave", ["off", "on"])
def test_kill9_then_resume_auto_gives_the_same_losses(tmp_path, synth_data, interleave):
    """Checkpoints every 5 steps of 40; the job is killed (SIGKILL to the launcher and both
    ranks) once step 12 is logged; --resume auto continues from the newest checkpoint
    (step 10, or a later one where the kill came late: steps take tens of ms here), and
    every step after it must equal the uninterrupted run's bit for bit (same threads, CPU)."""
    steps = 40
    args = CI + [f"--data.train={synth_data}/train", "--train.log_every=1", "--train.ckpt_every=5",
                 f"--train.steps={steps}", f"--data.shard_shuffle={interleave}"]  # on: epochs rebuilt from the run's seed
    full = run(HOROVODRUN + TRAIN + args + [f"--run.dir={tmp_path}/full"])
    assert full.returncode == 0, (full.stdout + full.stderr)[-3000:]
    metrics = tmp_path / "cut" / "metrics.jsonl"
    p = subprocess.Popen(HOROVODRUN + TRAIN + args + [f"--run.dir={tmp_path}/cut"], cwd=ROOT,
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for("step 12 logged", lambda: metrics.exists() and any(
            json.loads(x).get("step") == 12 for x in metrics.read_text().splitlines()), 240, p, poll_s=0.02)
    finally:
        kill_job(p.pid)  # launcher and both ranks, at once
        p.wait()
    saved = sorted(int(n[5:13]) for n in os.listdir(tmp_path / "cut") if n.startswith("ckpt-") and n.endswith(".pt"))
    assert saved and 10 <= saved[-1] < steps, saved
    k = saved[-1]
    res = run(HOROVODRUN + TRAIN + args + [f"--run.dir={tmp_path}/cut", "--resume", "auto"])
    out = res.stdout + res.stderr
    assert res.returncode == 0, out[-3000:]
    assert "resume: " in out and f"ckpt-{k:08d}.pt (step {k}" in out, out[-3000:]
    assert "taking over the stale lock" in out  # the killed run's lock
    a, b = losses(tmp_path / "full"), losses(tmp_path / "cut")
    assert [b[s] for s in range(k + 1, steps + 1)] == [a[s] for s in range(k + 1, steps + 1)]


# ---------------------------------------------------------------- guards
@pytest.fixture(scope="module")
def trained(tmp_path_factory, synth_data):
    """A finished 6-step run with checkpoints, to resume from."""
    d = tmp_path_factory.mktemp("trained")
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", "--train.steps=6",
                                       f"--run.dir={d}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return d / "run"


def test_resume_refuses_another_config_naming_both_hashes_unless_told(tmp_path, synth_data, trained):
    saved = json.load(open(trained / "config.json"))["config_hash"]
    args = CI + [f"--data.train={synth_data}/train", "--train.steps=6", f"--run.dir={trained}",
                 "--resume", "auto", "--optim.lr=0.01"]
    r = run(HOROVODRUN + TRAIN + args)
    assert exit_code(r) == 2
    err = r.stderr
    assert "refusing to resume" in err and f"config hash {saved} (checkpoint)" in err and "--resume-anyway" in err
    r = run(HOROVODRUN + TRAIN + args + ["--train.steps=8", "--resume-anyway"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "warning: --resume-anyway: config hash" in r.stdout and "(step 6" in r.stdout


def test_resume_refuses_other_data_naming_both_fingerprints(tmp_path, synth_data, trained):
    other = tmp_path / "other"
    write_split((Sample(f"o{i:04d}", jpeg(i), i % 10) for i in range(64)), str(other),
                [str(c) for c in range(10)], "train", 32)
    old = json.load(open(trained / "config.json"))["data_fingerprint"]["train"]
    new = json.load(open(other / "_info.json"))["fingerprint"]
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={other}", "--train.steps=6", f"--run.dir={trained}",
                                       "--resume", "auto"])
    assert exit_code(r) == 2
    assert f"train data fingerprint {old} (checkpoint) != {new} (this run)" in r.stderr


def test_resume_refuses_a_head_of_another_class_count(tmp_path, synth_data, trained):
    five = tmp_path / "five"
    write_split((Sample(f"f{i:04d}", jpeg(i), i % 5) for i in range(64)), str(five),
                [str(c) for c in range(5)], "train", 32)
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={five}", "--train.steps=6", f"--run.dir={trained}",
                                       "--resume", "auto", "--resume-anyway"])
    assert exit_code(r) == 2
    assert "has a 10-class head but the data has 5 classes" in r.stderr


def test_fresh_run_refuses_a_folder_with_checkpoints(synth_data, trained):
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", "--train.steps=6",
                                       f"--run.dir={trained}"])
    assert exit_code(r) == 2 and "already holds checkpoints" in r.stderr and "--resume auto" in r.stderr


def test_val_classes_that_differ_from_train_are_refused_before_step_1(tmp_path, synth_data):
    val = tmp_path / "val"
    names = json.load(open(f"{synth_data}/train/_info.json"))["classes"]
    names[3] = "cat"
    write_split((Sample(f"v{i:04d}", jpeg(i), i % 10) for i in range(32)), str(val), names, "val", 32)
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", f"--data.val={val}",
                                       f"--run.dir={tmp_path}/run"])
    assert exit_code(r) == 2
    assert "name their classes differently" in r.stderr and "(3, 'class003', 'cat')" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()  # stopped before the first step


def test_a_second_run_on_a_live_run_folder_is_refused(tmp_path, synth_data):
    args = CI + [f"--data.train={synth_data}/train", f"--run.dir={tmp_path}/run"]
    # the first run must outlive the second's start-up: it runs until killed
    first = subprocess.Popen(HOROVODRUN + TRAIN + args + ["--train.steps=100000"], cwd=ROOT, start_new_session=True,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for("the first run's first log line", (tmp_path / "run" / "metrics.jsonl").exists, 120, first)
        second = run(HOROVODRUN + TRAIN + args + ["--train.steps=400"])
        assert first.poll() is None
    finally:
        kill_job(first.pid)
        first.wait()
    assert exit_code(second) == 2
    assert "is in use by a live run" in second.stderr and f"{tmp_path}/run" in second.stderr


def test_non_finite_loss_stops_with_step_and_last_shard(tmp_path, synth_data):
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", "--optim.name=sgd",
                                       "--optim.lr=1e12", f"--run.dir={tmp_path}/run"])
    assert exit_code(r) == 1
    err = r.stderr
    assert "non-finite loss" in err and "by step" in err and "last data read: " in err and ".tar:" in err


def test_a_diverged_model_is_never_checkpointed(tmp_path, synth_data):
    """Losses are checked only every log_every steps, but a checkpoint is due earlier:
    the weights must be checked before they are written, or --resume auto would pick a
    diverged model (and best.pt could be one)."""
    from hvdtrain import checkpoint as ckpt
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", "--optim.name=sgd",
                                       "--optim.lr=1e12", "--train.log_every=10", "--train.ckpt_every=1",
                                       f"--run.dir={tmp_path}/run"])
    assert exit_code(r) == 1, (r.stdout + r.stderr)[-3000:]
    err = r.stderr
    assert "non-finite" in err and "not saved" in err and "last data read: " in err and ".tar:" in err
    for name in os.listdir(tmp_path / "run"):
        if name.endswith(".pt"):
            bad = ckpt.non_finite(ckpt.load(str(tmp_path / "run" / name))["model"])
            assert not bad, f"{name} holds non-finite weights: {bad[:3]}"


def test_val_loss_above_the_bound_stops_naming_the_val_data(tmp_path, synth_data):
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", f"--data.val={synth_data}/val",
                                       "--train.val_loss_bound=0.05", "--train.eval_every=4",
                                       f"--run.dir={tmp_path}/run"])
    assert exit_code(r) == 1
    err = r.stderr
    assert "validation loss" in err and "at step 4 is above the bound" in err
    assert f"{synth_data}/val" in err and "val-000000.tar" in err and "fingerprint" in err


def test_classify_run_evaluates_checkpoints_and_writes_its_outputs(tmp_path, synth_data):
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", f"--data.val={synth_data}/val",
                                       "--train.steps=20", "--train.eval_every=10", "--train.ckpt_every=5",
                                       "--train.keep_last=2",
                                       "--run.tensorboard=True", "--run.progress=True", f"--run.dir={tmp_path}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    d = tmp_path / "run"
    names = sorted(os.listdir(d))
    assert [n for n in names if n.startswith("ckpt-")] == ["ckpt-00000015.pt", "ckpt-00000020.pt"]
    assert "best.pt" in names and any(n.startswith("events.out.tfevents") for n in names)
    from PIL import Image
    with Image.open(d / "curves.png") as png:  # three panels: loss, val accuracy, lr
        assert png.format == "PNG" and png.size == (1200, 340)
    assert not any(".tmp" in n for n in names) and ".lock" not in names
    recs = [json.loads(x) for x in open(d / "metrics.jsonl")]
    val = [x for x in recs if "val_loss" in x]
    assert [x["step"] for x in val] == [10, 20] and all(x["val_samples"] == 64 for x in val)
    train = [x for x in recs if "train_loss" in x]
    for key in ("train_loss", "lr", "throughput_img_s", "elapsed_s", "epoch", "data_wait_share"):
        assert key in train[-1], key
    assert all(x["lr"] == 0.002 for x in train)  # the ci preset's constant lr, as used by each step
    cfg = json.load(open(d / "config.json"))
    assert len(cfg["git_sha"]) == 40 and cfg["data_fingerprint"]["val"] and cfg["config_hash"]
    assert "%|" in r.stderr  # the tqdm bar, on rank 0
    summary = json.load(open(d / "summary.json"))
    assert summary["steps"] == 20 and summary["val_samples"] == 64 and summary["images_per_s"] > 0
    assert summary["gpu"]["evaluated"] is False and summary["gpu"]["util_mean_pct"] is None  # no GPU: not 0 %


def test_contrastive_run_with_gathered_negatives_and_a_val_pass(tmp_path, synth_data):
    r = run(HOROVODRUN + TRAIN + ["--preset", "ci", "--run.progress=False", "--run.tensorboard=False",
                                  "--model.gather_negatives=True", "--train.steps=4", "--train.log_every=1",
                                  f"--data.train={synth_data}/train", f"--data.val={synth_data}/val",
                                  f"--run.dir={tmp_path}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    recs = [json.loads(x) for x in open(tmp_path / "run" / "metrics.jsonl")]
    first = recs[0]["train_loss"]
    # candidates: batch 8 x 2 ranks, so ln 16 = 2.77, not the local ln 8 = 2.08. The untrained loss sits a
    # little below ln 16 (two views of one image are alike before any training): 2.62-2.69 over 3 seeds,
    # measured, so the old 0.15 tolerance was at the edge of chance; 0.25 still tells the two apart
    assert abs(first - math.log(16)) < 0.25 and abs(first - math.log(16)) < abs(first - math.log(8))
    val = [x for x in recs if "val_loss" in x][-1]
    assert val["val_samples"] == 64 and 0 <= val["val_top1"] <= val["val_top5"] <= 1
