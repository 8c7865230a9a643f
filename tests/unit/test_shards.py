"""Shards: hvdtrain's writer (data.wds), DALI indexes, _info.json, path expansion, other tools' shards."""
import json
import os
import subprocess
import sys

import pytest
import webdataset as wds
from PIL import Image

from hvdtrain.data import make_shards
from hvdtrain.data.records import expand_braces
from hvdtrain.data.shards import open_shards, resolve_shards
from hvdtrain.data.tarindex import ShardError
from hvdtrain.data.wds import INFO_NAME, iter_samples, write_index
from tests.conftest import jpeg, unique_shards

WDS2IDX = os.path.join(os.path.dirname(sys.executable), "wds2idx")


def test_writer_counts_info_and_index_match_dalis_wds2idx(tmp_path):
    info = unique_shards(str(tmp_path), n=25, shard_size=10)
    assert [s["samples"] for s in info["shards"]] == [10, 10, 5] and info["total"] == 25
    assert json.load(open(tmp_path / INFO_NAME))["fingerprint"] == info["fingerprint"]
    for s in info["shards"]:
        tar = str(tmp_path / s["name"])
        ours = open(tar[:-4] + ".idx").read()
        subprocess.run([WDS2IDX, tar, str(tmp_path / "ref.idx")], check=True, capture_output=True)
        assert ours == open(tmp_path / "ref.idx").read()  # byte-identical to DALI's tool
        assert ours.startswith(f"v1.2 {s['samples']}\n")


def test_fingerprint_is_reproducible_and_content_sensitive(tmp_path):
    a = unique_shards(str(tmp_path / "a"), n=12, shard_size=5)
    b = unique_shards(str(tmp_path / "b"), n=12, shard_size=5)
    c = unique_shards(str(tmp_path / "c"), n=12, shard_size=5, classes=3)
    assert a["fingerprint"] == b["fingerprint"] != c["fingerprint"]


def test_our_shards_read_back_through_webdataset(tmp_path):
    unique_shards(str(tmp_path), n=15, shard_size=10)
    paths = resolve_shards(str(tmp_path))
    got = [(s["__key__"], int(s["cls"]), s["jpg"][:2]) for s in wds.WebDataset(paths, shardshuffle=False)]
    assert [k for k, _, _ in got] == [f"u{i:07d}" for i in range(15)]
    assert [c for _, c, _ in got] == [i % 10 for i in range(15)]
    assert all(magic == b"\xff\xd8" for _, _, magic in got)  # JPEG SOI marker


def test_brace_expansion_keeps_zero_padding():
    assert expand_braces("t-{000000..000002}.tar") == ["t-000000.tar", "t-000001.tar", "t-000002.tar"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]


def test_resolve_errors_name_what_is_missing(tmp_path):
    unique_shards(str(tmp_path), n=10, shard_size=5)
    assert len(resolve_shards(str(tmp_path / "train-{000000..000001}.tar"))) == 2
    with pytest.raises(ShardError, match=r"1 of 3 shard\(s\) missing: .*train-000002.tar"):
        resolve_shards(str(tmp_path / "train-{000000..000002}.tar"))
    os.makedirs(tmp_path / "empty")
    with pytest.raises(ShardError, match="holds no .tar"):
        resolve_shards(str(tmp_path / "empty"))
    with pytest.raises(ShardError, match="no shard path"):
        resolve_shards("")
    with pytest.raises(ShardError, match="matches no shard"):
        resolve_shards(str(tmp_path / "nothing-*.tar"))


def test_webdataset_shardwriter_shards_get_an_index(tmp_path):
    pattern = str(tmp_path / "ext-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=7) as sink:
        for i in range(16):
            sink.write({"__key__": f"s{i:04d}", "jpg": jpeg(i), "cls": str(i % 4)})
    assert not list(tmp_path.glob("*.idx"))
    shards = open_shards(str(tmp_path / "ext-{000000..000002}.tar"))
    assert shards.counts == [7, 7, 2] and all(os.path.exists(p) for p in shards.index_paths)
    assert shards.info_path is None and shards.fingerprint.startswith("q")


def test_stale_info_count_is_refused(tmp_path):
    unique_shards(str(tmp_path), n=10, shard_size=5)
    info = json.load(open(tmp_path / INFO_NAME))
    info["shards"][0]["samples"] = 4
    json.dump(info, open(tmp_path / INFO_NAME, "w"))
    with pytest.raises(ShardError, match="train-000000.tar: index has 5 samples but .* says 4"):
        open_shards(str(tmp_path))


def _save(path, fmt="JPEG", mode="RGB"):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (20, 16), 128).save(path, format=fmt)


def test_make_shards_imagefolder_any_case_png_and_rejects(tmp_path):
    src, out = tmp_path / "src", tmp_path / "out"
    _save(str(src / "cat" / "a.JPG"))
    _save(str(src / "cat" / "b.jpeg"))
    _save(str(src / "dog" / "c.png"), fmt="PNG")
    _save(str(src / "dog" / "d.Jpg"))
    (src / "dog" / "broken.jpg").write_bytes(b"this is not a jpeg")
    (src / "dog" / "notes.txt").write_text("ignored: not an image extension")
    report = make_shards.make(str(src), str(out), shard_size=2)
    info, rejected = report["train"]
    assert info["classes"] == ["cat", "dog"] and info["total"] == 4 and info["rejected"] == 1
    assert rejected[0][0].endswith("broken.jpg")
    labels = {}
    for tar in resolve_shards(str(out / "train")):
        for key, comps in iter_samples(tar):
            ext = next(e for e in comps if e != "cls")
            labels[key] = (ext, int(comps["cls"]))
    assert sorted(labels.values()) == [("jpg", 0), ("jpg", 0), ("jpg", 1), ("png", 1)]
    assert (out / "classes.txt").read_text() == "0\tcat\n1\tdog\n"


def test_make_shards_tinyimagenet_layout(tmp_path):
    src, out = tmp_path / "tin", tmp_path / "out"
    wnids = ["n02", "n01"]  # wnids.txt order, not sorted order, defines the index
    os.makedirs(src)
    (src / "wnids.txt").write_text("\n".join(wnids) + "\n")
    for w in wnids:
        for i in range(3):
            _save(str(src / "train" / w / "images" / f"{w}_{i}.JPEG"))
    ann = []
    for i, w in enumerate(["n01", "n02", "n01"]):
        _save(str(src / "val" / "images" / f"val_{i}.JPEG"))
        ann.append(f"val_{i}.JPEG\t{w}\t0\t0\t10\t10")
    (src / "val" / "val_annotations.txt").write_text("\n".join(ann) + "\n")
    report = make_shards.make(str(src), str(out))
    assert report["train"][0]["classes"] == wnids and report["train"][0]["total"] == 6
    val = [int(c["cls"]) for t in resolve_shards(str(out / "val")) for _, c in iter_samples(t)]
    assert sorted(val) == [0, 1, 1]  # n02 -> 0, n01 -> 1


def test_index_only_cli_and_truncated_tar_error(tmp_path):
    unique_shards(str(tmp_path), n=6, shard_size=6)
    tar = tmp_path / "train-000000.tar"
    os.remove(str(tar)[:-4] + ".idx")
    r = subprocess.run([sys.executable, "-m", "data.make_shards", "--index-only", str(tmp_path)],
                       capture_output=True, text=True)
    assert r.returncode == 0 and "6 samples indexed" in r.stdout
    data = tar.read_bytes()
    bad = tmp_path / "bad.tar"
    bad.write_bytes(data[:700])  # header + part of the first member
    with pytest.raises(ShardError, match="bad.tar"):
        write_index(str(bad))
