"""The header walk (data/tarindex.py) on tars other tools wrote, against tarfile and
DALI's wds2idx; compressed shards; indexes kept in the cache; verify's kept records."""
import gzip
import io
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time

import pytest
import webdataset as wds

from hvdtrain.data import cache, shards as S, verify
from hvdtrain.data.tarindex import ShardError, index_text, split_name, walk
from tests.conftest import jpeg


def tarfile_groups(path: str) -> list[tuple[str, tuple[str, ...]]]:
    """(key, sorted extensions) of every sample, grouped by key over the whole tar (tarfile's view)."""
    groups: dict[str, list[str]] = {}
    with tarfile.open(path) as t:
        for m in t.getmembers():
            if m.isfile():
                key, ext = split_name(m.name)
                groups.setdefault(key, []).append(ext)
    return sorted((k, tuple(sorted(v))) for k, v in groups.items())


def walk_groups(path: str) -> list[tuple[str, tuple[str, ...]]]:
    return sorted((split_name(c[0][3])[0], tuple(sorted(e for e, _, _, _ in c))) for c in walk(path).samples)


@pytest.fixture(scope="module")
def tars(tmp_path_factory):
    root = tmp_path_factory.mktemp("tars")
    out = {}
    with wds.ShardWriter(str(root / "sw-%06d.tar"), maxcount=10) as sink:
        for i in range(12):
            sink.write({"__key__": f"k{i:05d}", "jpg": jpeg(i), "cls": str(i % 3), "json": {"i": i}})
    out["shardwriter"] = str(root / "sw-000000.tar")
    folder = root / "folder"
    (folder / "sub" / "deeper").mkdir(parents=True)
    for i in range(5):  # upper-case .JPEG, an extra .txt, keys with folders in them
        d = folder if i < 3 else folder / "sub" / "deeper"
        (d / f"s{i}.JPEG").write_bytes(jpeg(i))
        (d / f"s{i}.cls").write_text(str(i % 2))
        (d / f"s{i}.txt").write_text(f"caption {i}")
    subprocess.run(["tar", "-cf", str(root / "gnu.tar"), "-C", str(folder), "."], check=True)
    out["gnu_tar_folder"] = str(root / "gnu.tar")
    long_key = "x" * 60 + "/" + "y" * 90 + "/sample"  # past ustar's 100-byte name field
    for fmt, name in ((tarfile.GNU_FORMAT, "gnu_long"), (tarfile.PAX_FORMAT, "pax_long")):
        p = str(root / f"{name}.tar")
        with tarfile.open(p, "w", format=fmt) as t:
            for j, ext in enumerate(("jpg", "cls")):
                data = jpeg(j) if ext == "jpg" else b"1"
                info = tarfile.TarInfo(f"{long_key}{j % 1}.{ext}")
                info.size = len(data)
                t.addfile(info, io.BytesIO(data))
        out[name] = p
    return out


def shardwriter_copy(tars, folder):
    """A copy of the ShardWriter shards (both tars) in `folder`, a fresh one."""
    folder.mkdir()
    for name in ("sw-000000.tar", "sw-000001.tar"):
        shutil.copyfile(os.path.join(os.path.dirname(tars["shardwriter"]), name), folder / name)
    return folder


@pytest.mark.parametrize("kind", ["shardwriter", "gnu_tar_folder", "gnu_long", "pax_long"])
def test_walk_groups_members_as_tarfile_does(tars, kind):
    assert walk_groups(tars[kind]) == tarfile_groups(tars[kind])
    w = walk(tars[kind])
    with open(tars[kind], "rb") as f:  # every offset points at the member's bytes
        for comps in w.samples:
            for ext, off, n, name in comps:
                f.seek(off)
                data = f.read(n)
                assert len(data) == n
                if ext.lower() in ("jpg", "jpeg"):
                    assert data[:2] == b"\xff\xd8", name


def test_gnu_tar_folder_keeps_dot_slash_keys_and_scattered_members(tars):
    groups = dict(walk_groups(tars["gnu_tar_folder"]))
    assert groups["./s0"] == ("JPEG", "cls", "txt") and groups["./sub/deeper/s4"] == ("JPEG", "cls", "txt")
    assert len(groups) == 5  # directory entries are not samples


def test_walk_index_equals_wds2idx_on_shardwriter_tars(tars, tmp_path):
    from wds2idx import IndexCreator

    ref = str(tmp_path / "ref.idx")
    with IndexCreator(tars["shardwriter"], ref, verbose=False) as c:
        c.create_index()
    assert index_text(walk(tars["shardwriter"]).samples) == open(ref).read()


def test_compressed_shards_are_refused_with_the_command(tars, tmp_path):
    gz = tmp_path / "packed"
    gz.mkdir()
    data = open(tars["shardwriter"], "rb").read()
    (gz / "sw-000000.tar.gz").write_bytes(gzip.compress(data))
    with pytest.raises(ShardError, match=r"gzip-compressed tar .*no \.tar.*gunzip -k"):
        S.resolve_shards(str(gz))
    with pytest.raises(ShardError, match=r"sw-000000\.tar\.gz: a gzip-compressed tar.*gunzip -k"):
        S.resolve_shards(str(gz / "sw-000000.tar.gz"))
    (tmp_path / "disguised.tar").write_bytes(gzip.compress(data))  # a .tar that is gzip inside
    with pytest.raises(ShardError, match=r"disguised\.tar: a gzip-compressed tar \(its first bytes"):
        walk(str(tmp_path / "disguised.tar"))


def test_read_only_shards_get_indexes_in_the_cache(tars, tmp_path, monkeypatch):
    """A real read-only bind mount: indexes go to the cache, keyed by content, and are
    found there again; a changed tar is noticed."""
    src, ro = shardwriter_copy(tars, tmp_path / "src"), tmp_path / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(ro)]).returncode != 0:
        pytest.skip("bind mounts need root (CI runs as root)")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True)
        monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))
        assert not os.access(str(ro), os.W_OK)
        first = S.open_shards(str(ro))
        assert first.where == {"cache": 2, "built": 2} and first.counts == [10, 2]
        assert all(p.startswith(str(tmp_path / "cache")) for p in first.index_paths)
        again = S.open_shards(str(ro))
        assert again.where == {"cache": 2} and again.index_paths == first.index_paths
        assert again.num_classes is None and again.meta[0]["max"] == 2
        rep = verify.verify(str(ro), decode=False, workers=2)
        assert rep.ok, [str(p) for p in rep.problems]
    finally:
        subprocess.run(["umount", str(ro)], check=True)


def test_verify_keeps_a_record_per_shard_by_content(tars, tmp_path, monkeypatch):
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))
    spec = os.path.join(os.path.dirname(tars["shardwriter"]), "sw-{000000..000001}.tar")
    first = verify.verify(spec, num_classes=3, workers=2)
    second = verify.verify(spec, num_classes=3, workers=2)
    assert first.splits["train"]["records_reused"] == 0 and second.splits["train"]["records_reused"] == 2
    assert first.splits["train"]["samples"] == second.splits["train"]["samples"] == 12
    assert [str(p) for p in first.problems] == [str(p) for p in second.problems]
    assert os.listdir(cache.root() + "/verify")


def test_a_kept_record_names_the_copy_it_is_used_for(tars, tmp_path, monkeypatch):
    """Records are kept by content: a copy of a damaged tar elsewhere reuses the record,
    and its problems name the copy, not the tar first checked."""
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))
    data = open(tars["shardwriter"], "rb").read()
    for d in ("a", "b"):
        (tmp_path / d).mkdir()
        (tmp_path / d / "cut.tar").write_bytes(data[:len(data) // 2])
    first = verify.verify(str(tmp_path / "a" / "cut.tar"), decode=False)
    again = verify.verify(str(tmp_path / "b" / "cut.tar"), decode=False)
    assert again.splits["train"]["records_reused"] == 1
    for rep, d in ((first, "a"), (again, "b")):
        msgs = [str(p) for p in rep.problems]
        assert any(m.startswith(f"{tmp_path / d / 'cut.tar'}: truncated tar") for m in msgs), msgs
        assert not any(str(tmp_path / ("b" if d == "a" else "a")) in m for m in msgs), msgs


def test_a_subset_of_a_split_gets_its_own_fingerprint_in_one_pass(synth_data, tmp_path, monkeypatch):
    """Two of a split's three tars (a glob): _info.json's fingerprint is the whole split's,
    so the subset gets one from its per-shard records, read in the same pass that finds
    the indexes (it was a second pass)."""
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))
    train = os.path.join(synth_data, "train")
    info = json.load(open(os.path.join(train, "_info.json")))
    passes = []
    real = S.ensure_indexes
    monkeypatch.setattr(S, "ensure_indexes", lambda *a, **k: passes.append(a[2]) or real(*a, **k))
    whole = S.open_shards(train)
    assert whole.fingerprint == info["fingerprint"] and whole.meta is None and passes == [False]
    sub = S.open_shards(os.path.join(train, "train-00000[01].tar"))
    assert passes == [False, True] and len(sub.paths) == 2 and sub.counts == [100, 100]
    assert sub.fingerprint != whole.fingerprint and sub.fingerprint == S.quick_fingerprint(sub.paths, sub.meta)
    assert sub.num_classes == info["num_classes"]  # still the split's classes


def test_prune_removes_what_no_run_used_and_a_run_keeps_what_it_reads(tars, tmp_path, monkeypatch):
    """Records of foreign shards and verify results in a cache of the test's own; two are
    made 40 days old, then one of them is read by open_shards (which refreshes its use):
    `python -m data.cache prune --older-than 30` removes only the other, and a later run
    builds it again."""
    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))
    src = shardwriter_copy(tars, tmp_path / "sw")
    S.open_shards(str(src))
    assert verify.verify(str(src), decode=False, workers=1).ok
    metas = sorted((tmp_path / "cache" / "data" / "v1" / "shards").iterdir())
    records = sorted((tmp_path / "cache" / "data" / "v1" / "verify").iterdir())
    assert len(metas) == 2 and len(records) == 2
    old = time.time() - 40 * 86400
    for p in (metas[0], records[0]):
        os.utime(p, (old, old))
    S.open_shards(str(src))  # reads both shards' records: metas[0] is used again
    assert metas[0].stat().st_mtime > old + 39 * 86400 and records[0].stat().st_mtime == pytest.approx(old)
    cli = [sys.executable, "-m", "data.cache"]
    env = {**os.environ, "HVDTRAIN_CACHE": str(tmp_path / "cache")}
    dry = subprocess.run(cli + ["prune", "--older-than", "30", "--dry-run"], env=env, capture_output=True, text=True)
    assert dry.returncode == 0 and "would remove 1 record(s)" in dry.stdout and records[0].exists(), dry
    r = subprocess.run(cli + ["prune", "--older-than", "30"], env=env, capture_output=True, text=True)
    assert r.returncode == 0 and "removed 1 record(s)" in r.stdout, r
    assert not records[0].exists() and metas[0].exists() and metas[1].exists() and records[1].exists()
    show = subprocess.run(cli, env=env, capture_output=True, text=True)
    assert re.search(r"verify\s+1 file\(s\)", show.stdout) and re.search(r"shards\s+2 file\(s\)", show.stdout), show
    assert verify.verify(str(src), decode=False, workers=1).ok and records[0].exists()  # built again
