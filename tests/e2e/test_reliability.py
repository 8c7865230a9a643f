"""The failure matrix of docs/reliability.md, one test per row or group of rows: bad data
through `data.make_shards`, `data.verify` and training (stop and skip), and faults (a
rank killed, a rank hung, a full disk). Real JPEGs, real tars, real horovodrun."""
import io
import json
import os
import signal
import subprocess
import sys
import tarfile
import time

import numpy as np
import pytest
from PIL import Image

from hvdtrain.data.wds import file_sha256, write_index, write_info
from tests.conftest import ROOT, jpeg
from tests.e2e.harness import CI, HOROVODRUN, TRAIN, exit_code, finish, run, wait_for
from tests.procs import rank_pid

PY = [sys.executable]


def encode(mode="RGB", fmt="JPEG", size=(40, 48), **kw) -> bytes:
    arr = np.random.default_rng(1).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt, **kw)
    return buf.getvalue()


def exif_rotated() -> bytes:
    im = Image.fromarray(np.zeros((20, 60, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display"
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    return buf.getvalue()


GOOD = jpeg(1, 40)
# images that must work: (key, member ext, bytes)
ODD_BUT_GOOD = [("pngasjpg", "jpg", encode(fmt="PNG")), ("cmyk", "jpg", encode("CMYK")),
                ("gray", "jpg", encode("L")), ("progressive", "jpg", encode(progressive=True)),
                ("exifrot", "jpg", exif_rotated()), ("upper", "JPEG", GOOD)]
# samples that must be reported: key -> (members, reason fragment)
BAD = {
    "corrupt": ([("jpg", GOOD[:200] + bytes(range(256)) * 4 + GOOD[1224:]), ("cls", b"1")], "undecodable image"),
    "truncjpg": ([("jpg", GOOD[: len(GOOD) // 2]), ("cls", b"1")], "undecodable image"),
    "zerobyte": ([("jpg", b""), ("cls", b"1")], "zero-byte image"),
    "textfile": ([("jpg", b"hello, I am text\n"), ("cls", b"1")], "undecodable image"),
    "nolabel": ([("jpg", GOOD)], "no .cls label member"),
    "noimage": ([("cls", b"1")], "no image member"),
    "catlabel": ([("jpg", GOOD), ("cls", b"cat")], "is not a decimal class index"),
    "bigLabel": ([("jpg", GOOD), ("cls", b"12")], "label 12 out of range [0, 3)"),
}


def said(text: str, key: str, why: str) -> bool:
    """`text` names sample `key` (as `<tar>: <key>: ...`) and the reason on one line."""
    return any(f": {key}: " in line and why in line for line in text.splitlines())


def write_tar(path, samples):
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as t:
        for key, members in samples:
            for ext, data in members:
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))


def make_split(d, samples, shard_size=40):
    """Shards + indexes + _info.json (3 classes) from raw (key, members) samples."""
    os.makedirs(d, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, len(samples), shard_size)):
        name = f"train-{s:06d}.tar"
        write_tar(os.path.join(d, name), samples[start:start + shard_size])
        path = os.path.join(d, name)
        shards.append({"name": name, "samples": write_index(path), "sha256": file_sha256(path)})
    write_info(str(d), shards, ["a", "b", "c"], "train")
    return str(d)


def good(i):
    return (f"g{i:04d}", [("jpg", jpeg(i, 40)), ("cls", str(i % 3).encode())])


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory):
    """120 good samples, the six odd-but-good ones, and one of each bad kind, in 4 shards."""
    samples = [good(i) for i in range(120)]
    for j, (key, ext, data) in enumerate(ODD_BUT_GOOD):
        samples.insert(7 + 9 * j, (key, [(ext, data), ("cls", b"2")]))
    for j, (key, (members, _)) in enumerate(BAD.items()):
        samples.insert(13 + 15 * j, (key, members))
    return make_split(tmp_path_factory.mktemp("bad") / "train", samples)


def test_verify_reports_every_bad_sample_in_one_pass(bad_data, tmp_path):
    r = run(PY + ["-m", "data.verify", bad_data, "--json", str(tmp_path / "v.json")])
    assert r.returncode == 1, r.stdout + r.stderr
    for key, (_, why) in BAD.items():
        assert said(r.stdout, key, why), key
    for key, _, _ in ODD_BUT_GOOD:
        assert f": {key}:" not in r.stdout, key
    assert f"{len(BAD)} bad sample(s)" in r.stdout and f"{len(BAD)} problem(s)" in r.stdout
    rep = json.load(open(tmp_path / "v.json"))
    assert sorted(p["key"] for p in rep["problems"]) == sorted(BAD)


def test_training_stops_on_a_bad_sample_naming_shard_and_key(bad_data, tmp_path):
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={bad_data}", f"--run.dir={tmp_path}/run"])
    assert exit_code(r) == 1, (r.stdout + r.stderr)[-3000:]
    err = r.stderr
    assert "hvdtrain.train: rank" in err and "A scan of rank" in err and "data.verify" in err
    assert "on_error=skip" in err and ".tar: " in err
    assert any(said(err, key, why) for key, (_, why) in BAD.items()), err[-3000:]


def test_training_with_on_error_skip_skips_and_counts(bad_data, tmp_path):
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={bad_data}", "--data.on_error=skip", "--train.steps=12",
                                       f"--run.dir={tmp_path}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert f"skipping {len(BAD)} bad sample(s) (data.on_error=skip)" in r.stdout
    skipped = json.load(open(tmp_path / "run" / "config.json"))["data"]["train"]["skipped"]
    assert sorted(s.split(": ")[1] for s in skipped) == sorted(BAD)


def test_make_shards_rejects_undecodable_files_lists_them_and_keeps_odd_good_ones(tmp_path):
    src = tmp_path / "tree"
    for c in ("a", "b", "c"):
        os.makedirs(src / c)
        for i in range(4):
            (src / c / f"{c}{i}.jpg").write_bytes(jpeg(i, 40))
    for key, ext, data in ODD_BUT_GOOD:
        (src / "b" / f"{key}.{ext}").write_bytes(data)
    rejects = {k: BAD[k][0][0][1] for k in ("corrupt", "truncjpg", "zerobyte", "textfile")}
    for key, data in rejects.items():
        (src / "a" / f"{key}.jpg").write_bytes(data)
    r = run(PY + ["-m", "data.make_shards", str(src), str(tmp_path / "out")])
    assert r.returncode == 0, r.stderr
    assert f"train: {12 + len(ODD_BUT_GOOD)} samples" in r.stdout and f"rejected {len(rejects)}" in r.stdout
    for key in rejects:
        assert f"rejected {src}/a/{key}.jpg: " in r.stderr
    info = json.load(open(tmp_path / "out" / "train" / "_info.json"))
    assert info["rejected"] == len(rejects) and len(info["rejected_files"]) == len(rejects)
    v = run(PY + ["-m", "data.verify", str(tmp_path / "out" / "train")])
    assert v.returncode == 0, v.stdout
    t = run(HOROVODRUN + TRAIN + CI + [f"--data.train={tmp_path}/out/train", "--train.steps=4",
                                       "--train.batch_size=4", f"--run.dir={tmp_path}/run"])
    assert t.returncode == 0, (t.stdout + t.stderr)[-3000:]


def test_truncated_tar_is_named_at_start_reported_by_verify_and_skippable(tmp_path):
    d = make_split(tmp_path / "train", [good(i) for i in range(80)])
    tar = os.path.join(d, "train-000001.tar")
    data = open(tar, "rb").read()
    open(tar, "wb").write(data[: len(data) // 2])
    os.utime(tar.replace(".tar", ".idx"))  # the index stays newer: not rebuilt
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={d}", f"--run.dir={tmp_path}/run"])
    assert exit_code(r) == 2 and f"{tar}: truncated tar" in r.stderr
    v = run(PY + ["-m", "data.verify", d])
    assert v.returncode == 1 and f"{tar}: truncated tar" in v.stdout
    s = run(HOROVODRUN + TRAIN + CI + [f"--data.train={d}", "--data.on_error=skip", "--train.steps=4",
                                       f"--run.dir={tmp_path}/skip"])
    assert s.returncode == 0, (s.stdout + s.stderr)[-3000:]
    assert "cut off by the end of a truncated tar" in s.stdout and "skipping" in s.stdout


def test_stale_index_is_named_and_a_missing_one_is_built(tmp_path):
    d = make_split(tmp_path / "train", [good(i) for i in range(80)])
    idx0, idx1 = (os.path.join(d, f"train-00000{i}.idx") for i in (0, 1))
    os.replace(idx1, idx0)  # shard 0 now has shard 1's index: same count, other members
    os.utime(idx0)
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={d}", f"--run.dir={tmp_path}/run"])
    assert exit_code(r) == 2 and f"stale index {idx0}" in r.stderr and "--index-only" in r.stderr
    v = run(PY + ["-m", "data.verify", d])
    assert f"{idx0}: stale index" in v.stdout and f"{idx1}: missing DALI index" in v.stdout
    os.remove(idx0)  # both missing: training builds them beside the tars
    t = run(HOROVODRUN + TRAIN + CI + [f"--data.train={d}", "--train.steps=2", f"--run.dir={tmp_path}/run2"])
    assert t.returncode == 0, (t.stdout + t.stderr)[-3000:]
    assert os.path.exists(idx0) and os.path.exists(idx1)


@pytest.mark.parametrize("spec,says", [("{d}/nothing-{{000..003}}.tar", "4 of 4 shard(s) missing"),
                                       ("{d}/*.tar", "pattern matches no shard"),
                                       ("{d}", "directory holds no .tar shards")])
def test_empty_shard_lists_are_refused_naming_the_pattern(tmp_path, spec, says):
    spec = spec.format(d=tmp_path)
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={spec}", f"--run.dir={tmp_path}/run"])
    assert exit_code(r) == 2 and says in r.stderr and spec in r.stderr


# ---------------------------------------------------------------- faults
def start_and_wait(tmp_path, synth_data, *extra):
    args = CI + [f"--data.train={synth_data}/train", "--train.steps=100000", f"--run.dir={tmp_path}/run", *extra]
    p = subprocess.Popen(HOROVODRUN + TRAIN + args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True, start_new_session=True)
    wait_for("the first log line", (tmp_path / "run" / "metrics.jsonl").exists, 120, p)
    time.sleep(1)  # a second of steps past the first log line: the kill lands mid-training
    return p


def wait_end(p, limit_s):
    t0 = time.time()
    out, err = finish(p, limit_s)
    return time.time() - t0, out, err


def test_a_rank_killed_mid_step_ends_the_job_naming_it(tmp_path, synth_data):
    p = start_and_wait(tmp_path, synth_data)
    os.kill(rank_pid("hvdtrain.train", str(tmp_path / "run"), rank=1), signal.SIGKILL)
    took, out, err = wait_end(p, 60)
    assert p.returncode != 0
    assert "Process name: 1" in err and "Exit code: 137" in err  # horovodrun names the dead rank
    assert subprocess.run(["pgrep", "-f", f"run.dir={tmp_path}/run"], capture_output=True).returncode == 1


def test_a_hung_rank_is_ended_by_the_watchdog(tmp_path, synth_data):
    p = start_and_wait(tmp_path, synth_data, "--run.watchdog_s=8")
    stuck = rank_pid("hvdtrain.train", str(tmp_path / "run"), rank=1)
    os.kill(stuck, signal.SIGSTOP)  # alive but silent: horovodrun cannot see it, Gloo waits
    try:
        took, out, err = wait_end(p, 90)
    finally:
        try:
            os.kill(stuck, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "hvdtrain: rank 0: no progress for" in err and "run.watchdog_s=8" in err
    assert "Exit code: 3" in err and took < 60


def test_a_full_disk_at_checkpoint_time_is_a_clear_error(tmp_path, synth_data):
    """Files capped at 64 KiB (`ulimit -f`; Python ignores SIGXFSZ, so writes fail with EFBIG)."""
    cmd = HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", "--train.steps=4",
                                     f"--run.dir={tmp_path}/run"]
    r = run(["bash", "-c", 'ulimit -f 64 && exec "$@"', "bash"] + cmd)
    assert exit_code(r) == 1, (r.stdout + r.stderr)[-3000:]
    assert "could not write checkpoint" in r.stderr and "File too large" in r.stderr
    assert "--resume auto" in r.stderr
    assert not [n for n in os.listdir(tmp_path / "run") if ".tmp" in n or n.startswith("ckpt-")]


def test_elastic_training_continues_on_the_survivor_when_a_worker_dies(tmp_path, synth_data):
    """horovodrun --min-np 1 --max-np 2 with a discovery script naming two "hosts" that are
    both this machine (localhost, 127.0.0.1: Horovod blacklists a failed worker's host, so
    one name per worker). The worker on 127.0.0.1 is killed after step 15 of 200 (room to
    spare on a fast machine); the survivor rolls back to the last commit, rebuilds its
    DALI pipeline for 1 rank and finishes."""
    disc = tmp_path / "discover.sh"
    disc.write_text("#!/bin/sh\necho localhost:1\necho 127.0.0.1:1\n")
    disc.chmod(0o755)
    run_dir = tmp_path / "run"
    cmd = [os.path.join(os.path.dirname(sys.executable), "horovodrun"), "--gloo", "-np", "2", "--min-np", "1", "--max-np", "2",
           "--host-discovery-script", str(disc)] + TRAIN + CI + [
        "--elastic", f"--data.train={synth_data}/train", f"--data.val={synth_data}/val", "--train.eval_every=100",
        "--train.steps=200", "--train.log_every=5", f"--run.dir={run_dir}"]
    p = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         start_new_session=True)
    metrics = run_dir / "metrics.jsonl"
    wait_for("step 15 logged", lambda: metrics.exists() and '"step": 15,' in metrics.read_text(), 150, p, 0.05)
    victim = rank_pid("hvdtrain.train", str(run_dir), env=("HOROVOD_HOSTNAME=127.0.0.1",))  # the worker on 127.0.0.1
    os.kill(victim, signal.SIGKILL)
    took, out, err = wait_end(p, 200)
    assert p.returncode == 0, (out + err)[-3000:]
    assert "elastic: rank 0 of 1 now; rebuilt its DALI pipeline (shard 0 of 1)" in out
    recs = [json.loads(x) for x in metrics.read_text().splitlines()]
    train = [r for r in recs if "train_loss" in r]
    assert train[-1]["step"] == 200 and train[-1]["ranks"] == 1
    assert {r["ranks"] for r in train} == {1, 2}
    # the val loader was rebuilt for the new world too: the survivor reads the whole val set
    # (a loader left at num_shards=2 would count half of it)
    val = [r for r in recs if "val_loss" in r]
    assert [r["step"] for r in val] == [100, 200] and all(r["val_samples"] == 64 for r in val), val
    assert json.load(open(run_dir / "summary.json"))["steps"] == 200
