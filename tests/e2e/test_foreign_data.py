"""Data users bring, trained as it is: shards other tools wrote (webdataset's ShardWriter
and TarWriter in img2dataset's layout, GNU tar over a folder, WebP images), a read-only
data set (a real read-only bind mount), and a data.make_shards build killed with SIGKILL
and run again. Each run is one short training launch; the data is made once per module."""
import filecmp
import json
import os
import shutil
import signal
import subprocess
import sys

import pytest
import webdataset as wds
from PIL import Image

from tests.conftest import ROOT, jpeg
from tests.e2e.harness import HOROVODRUN, run, wait_for

TRAIN = [sys.executable, "-m", "hvdtrain.train", "--preset", "ci", "--train.steps=2", "--run.progress=False",
         "--run.tensorboard=False"]


def webp(i: int) -> bytes:
    import io

    buf = io.BytesIO()
    Image.open(io.BytesIO(jpeg(i))).save(buf, format="WEBP")
    return buf.getvalue()


@pytest.fixture(scope="module")
def foreign(tmp_path_factory):
    root = tmp_path_factory.mktemp("foreign")
    out = {"root": root}
    for name, image_ext, image in (("sw", "jpg", jpeg), ("webp", "webp", webp)):
        (root / name).mkdir()
        with wds.ShardWriter(str(root / name / f"{name}-%06d.tar"), maxcount=24) as sink:
            for i in range(40):  # labels 0..4; no index, no _info.json
                sink.write({"__key__": f"k{i:05d}", image_ext: image(i), "cls": str(i % 5), "json": {"i": i}})
        out[name] = str(root / name)
    (root / "i2d").mkdir()
    with wds.TarWriter(str(root / "i2d" / "00000.tar")) as sink:  # img2dataset: no label member
        for i in range(24):
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"a caption {i}", "json": {"url": f"u{i}"}})
    out["i2d"] = str(root / "i2d")
    folder = root / "folder"
    (folder / "part" / "b").mkdir(parents=True)
    for i in range(24):  # ./ prefixes, directory entries, .JPEG, an extra .txt, keys with folders
        d = folder if i % 2 else folder / "part" / "b"
        (d / f"img{i}.JPEG").write_bytes(jpeg(i))
        (d / f"img{i}.cls").write_text(str(i % 3))
        (d / f"img{i}.txt").write_text("x")
    (root / "gnu").mkdir()
    subprocess.run(["tar", "-cf", str(root / "gnu" / "all.tar"), "-C", str(folder), "."], check=True)
    out["gnu"] = str(root / "gnu")
    out["env"] = {**os.environ, "HVDTRAIN_CACHE": str(root / "cache")}
    return out


def _config(run_dir) -> dict:
    return json.load(open(os.path.join(run_dir, "config.json")))


def test_shardwriter_shards_classify_with_classes_from_their_labels(foreign, tmp_path):
    r = run(TRAIN + ["--task", "classify", f"--data.train={foreign['sw']}", f"--run.dir={tmp_path}/run"],
            env=foreign["env"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "done: step 2," in r.stdout
    assert _config(tmp_path / "run")["data"]["train"]["num_classes"] == 5
    r = run(TRAIN + ["--task", "classify", "--data.num_classes=4", f"--data.train={foreign['sw']}",
                     f"--run.dir={tmp_path}/run4"], env=foreign["env"])
    assert r.returncode == 2, r.stderr[-2000:]
    assert "sw-000000.tar: sample k00004 has label 4 out of range [0, 4) (--data.num_classes=4)" in r.stderr


def test_unlabeled_img2dataset_shards_pretrain_and_classify_is_refused(foreign, tmp_path):
    r = run(TRAIN + ["--task", "contrastive", f"--data.train={foreign['i2d']}", f"--run.dir={tmp_path}/run"],
            env=foreign["env"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "done: step 2," in r.stdout
    r = run(TRAIN + ["--task", "classify", f"--data.train={foreign['i2d']}", f"--run.dir={tmp_path}/run2"],
            env=foreign["env"])
    assert r.returncode == 2 and "Underful" not in r.stderr + r.stdout
    assert ("00000.tar: sample 000000000 has no .cls label (its members: ['jpg', 'json', 'txt']; 24 of 24 "
            "samples") in r.stderr and "--train.task=contrastive trains on unlabeled images" in r.stderr


def test_webp_shards_and_a_tar_of_a_folder_train(foreign, tmp_path):
    r = run(TRAIN + ["--task", "classify", f"--data.train={foreign['webp']}", f"--data.val={foreign['gnu']}",
                     "--train.eval_every=2", f"--run.dir={tmp_path}/run"], env=foreign["env"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    recs = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [x["val_samples"] for x in recs if "val_loss" in x] == [24]  # every sample of the tar of a folder
    assert _config(tmp_path / "run")["data"]["train"]["num_classes"] == 5


def test_read_only_data_set_two_ranks_one_builder(foreign, tmp_path):
    src, ro = tmp_path / "src", tmp_path / "ro"
    src.mkdir()
    ro.mkdir()
    for name in sorted(os.listdir(foreign["sw"])):
        if name.endswith(".tar"):  # the tars alone, as a tool wrote them: no index
            shutil.copy(os.path.join(foreign["sw"], name), src / name)
    if subprocess.run(["mount", "--bind", str(src), str(ro)]).returncode != 0:
        pytest.skip("bind mounts need root (CI runs as root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        env = {**foreign["env"], "HVDTRAIN_CACHE": str(tmp_path / "cache")}
        r = run(HOROVODRUN + TRAIN + ["--task", "classify", f"--data.train={ro}", f"--run.dir={tmp_path}/run"],
                env=env)
        assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
        assert r.stdout.count("data: indexed 2/2 shard(s)") == 1  # one rank built, the other found them
        assert not [f for f in os.listdir(ro) if f.endswith(".idx")]
        assert len(os.listdir(tmp_path / "cache" / "data" / "v1" / "indexes")) == 2
        r = run([sys.executable, "-m", "data.make_shards", "--index-only", str(ro)], env=env)
        assert r.returncode == 0 and "2 shard(s), 40 samples indexed; 0 index(es) built" in r.stdout
        assert "(indexes: 2 cache)" in r.stdout
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_killed_make_shards_resumes_to_identical_bytes(tmp_path):
    src = tmp_path / "src"
    big = tmp_path / "big.jpg"  # large images: the build takes long enough to be killed halfway
    y = __import__("numpy").mgrid[0:1200, 0:1600][0]
    Image.fromarray((y % 251).astype("uint8")).convert("RGB").save(big, quality=95)
    for i in range(48):
        d = src / f"c{i % 3}"
        d.mkdir(parents=True, exist_ok=True)
        os.link(big, d / f"i{i:03d}.jpg")
    cmd = [sys.executable, "-m", "data.make_shards", "--shard-size", "2", "--workers", "2", str(src)]
    r = run(cmd + [str(tmp_path / "whole")])
    assert r.returncode == 0, r.stderr
    p = subprocess.Popen(cmd + [str(tmp_path / "killed")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         start_new_session=True, cwd=ROOT)
    parts = tmp_path / "killed" / "train" / ".parts"
    done = lambda: [f for f in os.listdir(parts) if f.endswith(".json")] if parts.is_dir() else []  # noqa: E731
    wait_for("two shards finished", lambda: len(done()) >= 2, 60, p, poll_s=0.01)
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()
    kept = len(done())  # a record the kill caught half-written is a .tmp file: not a finished shard
    assert 2 <= kept < 24 and not (tmp_path / "killed" / "train" / "_info.json").exists()
    r = run(cmd + [str(tmp_path / "killed")])
    assert r.returncode == 0, r.stderr
    assert f"{kept} finished shard(s) kept" in r.stdout
    whole, killed = tmp_path / "whole" / "train", tmp_path / "killed" / "train"
    names = sorted(f for f in os.listdir(whole) if not f.startswith("."))
    assert names == sorted(f for f in os.listdir(killed) if not f.startswith("."))
    assert len([n for n in names if n.endswith(".tar")]) == 24 and "_info.json" in names
    assert all(filecmp.cmp(whole / n, killed / n, shallow=False) for n in names), names
