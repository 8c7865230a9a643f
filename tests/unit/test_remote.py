"""Shards in buckets, against real servers in their own processes (moto's S3 server and
the GCS emulator, tests/stores.py): listing, indexes, the data fingerprint, credentials
in URLs, data.verify's records by ETag, and make_shards into a bucket."""
import os
import shutil

import pytest
import webdataset as wds

from tests.conftest import jpeg
from tests.stores import GCSServer, S3Server


@pytest.fixture(scope="module")
def servers():
    with S3Server() as s3, GCSServer() as gcs:
        yield {"s3": s3, "gs": gcs}


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process with no store clients yet, its own caches, and the servers' endpoints."""
    from hvdtrain.data import nodecache, remote

    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "hvdcache"))
    monkeypatch.setenv("HVDTRAIN_SHARD_CACHE", str(tmp_path / "shards"))
    remote._STORES.clear()
    yield
    nodecache.close_all()
    remote._STORES.clear()


def shardwriter_set(folder, n=240, per=60, classes=6):
    """Shards as webdataset's ShardWriter writes them: no .idx, no _info.json."""
    os.makedirs(folder, exist_ok=True)
    with wds.ShardWriter(os.path.join(folder, "train-%06d.tar"), maxcount=per, verbose=0) as sink:
        for i in range(n):
            sink.write({"__key__": f"k{i:05d}", "jpg": jpeg(i, 24), "cls": str(i % classes)})
    return folder


@pytest.fixture(scope="module")
def dataset(servers, tmp_path_factory):
    """The same ShardWriter shards in a folder, in an S3 bucket and in a GCS bucket, beside
    objects that are not shards (a README, a tar one level below the prefix)."""
    folder = shardwriter_set(str(tmp_path_factory.mktemp("wds") / "train"))
    extra = tmp_path_factory.mktemp("extra")
    (extra / "README.txt").write_text("not a shard")
    for scheme, server in servers.items():
        server.upload(folder, "hvd-data", "sets/a/")
        server.upload(str(extra), "hvd-data", "sets/a/", create=False)
        server.upload(folder, "hvd-data", "sets/a/deeper/", create=False)
    return folder


def copy_of(folder, tmp_path) -> str:
    """The shards in a folder of the test's own (opening them writes indexes beside them)."""
    out = str(tmp_path / "copy")
    shutil.copytree(folder, out)
    return out


def env_for(monkeypatch, servers):
    for s in servers.values():
        for k, v in s.env().items():
            monkeypatch.setenv(k, v)


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_a_prefix_opens_as_the_folder_does(servers, dataset, fresh, monkeypatch, tmp_path, scheme):
    """Every *.tar directly under the prefix, nothing else; indexes built from the streamed
    bytes (then found in the cache); labels, counts and the data fingerprint equal to
    those of the same shards in a folder."""
    from hvdtrain.data import remote
    from hvdtrain.data.shards import open_shards

    env_for(monkeypatch, servers)
    tars, beside = remote.resolve(f"{scheme}://hvd-data/sets/a/")
    assert [t.name for t in tars] == sorted(os.listdir(dataset)) and "README.txt" in beside
    assert not any("deeper" in t.url for t in tars)
    local = open_shards(copy_of(dataset, tmp_path))
    lines = []
    got = open_shards(f"{scheme}://hvd-data/sets/a/", log=lines.append)
    assert got.counts == local.counts and got.fingerprint == local.fingerprint
    assert got.where == {"built": 4} and got.is_remote and got.unlabeled == 0
    assert [m["max"] for m in got.meta] == [m["max"] for m in local.meta]
    assert any("indexed 4/4 shard(s) from the bucket" in x for x in lines)
    again = open_shards(f"{scheme}://hvd-data/sets/a/train-{{000000..000003}}.tar")
    assert again.where == {"cache": 4} and again.fingerprint == local.fingerprint
    assert "credentials" in got.describe()["store"] or "emulator" in got.describe()["store"]


def test_missing_shards_empty_prefixes_and_missing_buckets_are_named(servers, dataset, fresh, monkeypatch):
    from hvdtrain.data import remote
    from hvdtrain.data.remote import RemoteError

    env_for(monkeypatch, servers)
    with pytest.raises(RemoteError, match=r"1 of 5 shard\(s\) missing: s3://hvd-data/sets/a/train-000004\.tar"):
        remote.resolve("s3://hvd-data/sets/a/train-{000000..000004}.tar")
    with pytest.raises(RemoteError, match=r"s3://hvd-data/sets/none/: no \.tar objects directly under this prefix"):
        remote.resolve("s3://hvd-data/sets/none/")
    with pytest.raises(RemoteError, match=r"s3://no-such-bucket/x/: LIST: no such bucket no-such-bucket.*"
                                          r"credentials from the environment"):
        remote.resolve("s3://no-such-bucket/x/")
    with pytest.raises(RemoteError, match=r"gs://no-such-bucket/x/: LIST: not found.*emulator"):
        remote.resolve("gs://no-such-bucket/x/")


def test_a_url_carrying_credentials_is_refused_without_echoing_it(servers, fresh, monkeypatch):
    from hvdtrain.data import remote
    from hvdtrain.data.remote import RemoteError
    from hvdtrain.data.shards import open_shards

    with pytest.raises(RemoteError) as e:
        open_shards("s3://AKIDX:topsecret@hvd-data/sets/a/")
    assert "refused" in str(e.value) and "topsecret" not in str(e.value)
    with pytest.raises(RemoteError) as e:
        open_shards("https://user:topsecret@example.com/shards/")
    assert "topsecret" not in str(e.value)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://user:topsecret@127.0.0.1:9/")
    with pytest.raises(RemoteError) as e:
        remote.store_for("s3://hvd-data/x/")
    assert "AWS_ENDPOINT_URL=http://***@127.0.0.1:9/" in str(e.value) and "topsecret" not in str(e.value)


def test_an_idx_beside_the_shard_is_used_when_it_fits_and_ignored_when_stale(servers, dataset, fresh, monkeypatch,
                                                                              tmp_path):
    """Shard 0's .idx describes it: copied into the cache. Shard 1's is shard 0's: it does
    not fit (the tar headers at its offsets say otherwise), so shard 1 is indexed from its
    bytes, and the log says why."""
    from hvdtrain.data.shards import open_shards
    from hvdtrain.data.wds import write_index

    env_for(monkeypatch, servers)
    work = tmp_path / "idx"
    shutil.copytree(dataset, work)
    write_index(str(work / "train-000000.tar"))
    write_index(str(work / "train-000002.tar"))
    shutil.copy(work / "train-000002.idx", work / "train-000001.idx")
    c = servers["s3"].client()
    for name in ("train-000000.idx", "train-000001.idx"):
        c.upload_file(str(work / name), "hvd-data", f"sets/a/{name}")
    try:
        lines = []
        got = open_shards("s3://hvd-data/sets/a/", log=lines.append)
        assert got.where == {"built": 4}  # no label records yet: every shard streams once
        got = open_shards("s3://hvd-data/sets/a/", log=lines.append)
        assert got.where == {"cache": 4}
        shutil.rmtree(os.environ["HVDTRAIN_CACHE"] + "/data/v1/indexes")
        got = open_shards("s3://hvd-data/sets/a/", log=lines.append)
        assert got.where == {"bucket": 1, "built": 3}, got.where
        assert any("train-000001.idx does not fit its shard" in x for x in lines), lines
        assert got.fingerprint == open_shards(copy_of(dataset, tmp_path)).fingerprint
    finally:
        for name in ("train-000000.idx", "train-000001.idx"):
            c.delete_object(Bucket="hvd-data", Key=f"sets/a/{name}")


@pytest.mark.parametrize("scheme", ["s3", "gs"])
def test_verify_on_a_bucket_keeps_its_records_by_etag(servers, dataset, fresh, monkeypatch, tmp_path, scheme):
    """The second pass reads no shard again; a replaced object (new ETag/generation) is
    checked anew, and its bad sample named by URL."""
    from hvdtrain.data import verify

    env_for(monkeypatch, servers)
    spec = f"{scheme}://hvd-data/verify-{scheme}/"
    servers[scheme].upload(dataset, "hvd-data", f"verify-{scheme}/", create=False)
    first = verify.verify(spec, num_classes=6)
    assert first.ok and first.splits["train"]["samples"] == 240 and not first.splits["train"]["records_reused"]
    again = verify.verify(spec, num_classes=6)
    assert again.ok and again.splits["train"]["records_reused"] == 4
    bad = tmp_path / "bad"
    os.makedirs(bad)
    with wds.TarWriter(str(bad / "train-000003.tar")) as sink:
        sink.write({"__key__": "k99999", "jpg": b"not a jpeg", "cls": "1"})
    servers[scheme].upload(str(bad), "hvd-data", f"verify-{scheme}/", create=False)
    from hvdtrain.data import remote
    remote._KNOWN.clear()
    third = verify.verify(spec, num_classes=6)
    assert third.splits["train"]["records_reused"] == 3
    assert [str(p) for p in third.problems if p.key] == [
        f"{spec}train-000003.tar: k99999: undecodable image (UnidentifiedImageError: cannot identify image file "
        f"<_io.BytesIO object at {str(third.problems[0]).split('object at ')[1]}"]


def test_make_shards_into_a_bucket_uploads_and_resumes(servers, fresh, monkeypatch, tmp_path):
    """A build into s3:// uploads each finished shard with its .idx, _info.json last; a build
    cut short (one shard and _info.json never uploaded) run again uploads only what is
    missing, and the bucket then opens with the fingerprint of a local build."""
    from hvdtrain.data import make_shards, synth
    from hvdtrain.data.shards import open_shards

    env_for(monkeypatch, servers)
    servers["s3"].client().create_bucket(Bucket="hvd-made")
    src = tmp_path / "tree"
    synth.write_tinyimagenet_tree(str(src), 3, 12, 3, 24, 3)
    local = make_shards.make(str(src), str(tmp_path / "local"), shard_size=10, workers=1)
    out = "s3://hvd-made/tiny/"
    make_shards.make(str(src), out, shard_size=10, workers=1, staging=str(tmp_path / "stage"))
    c = servers["s3"].client()
    keys = sorted(o["Key"] for o in c.list_objects_v2(Bucket="hvd-made", Prefix="tiny/")["Contents"])
    assert "tiny/train/_info.json" in keys and "tiny/train/train-000003.idx" in keys and "tiny/classes.txt" in keys
    assert not [f for f in os.listdir(tmp_path / "stage" / "train") if f.endswith(".tar")]  # uploaded, then gone
    c.delete_object(Bucket="hvd-made", Key="tiny/train/_info.json")
    rec = tmp_path / "stage" / "train" / ".parts" / "train-000002.tar.json"
    os.remove(rec)
    c.delete_object(Bucket="hvd-made", Key="tiny/train/train-000002.tar")
    report = make_shards.make(str(src), out, shard_size=10, workers=1, staging=str(tmp_path / "stage"))
    assert report["train"][0]["reused_shards"] == 3
    got = open_shards(out + "train/")
    assert got.fingerprint == local["train"][0]["fingerprint"] and got.where == {"bucket": 4}
    assert got.classes == local["train"][0]["classes"]


def test_index_only_uploads_indexes_beside_the_shards_or_says_they_stay_in_the_cache(fresh, monkeypatch, tmp_path):
    """`make_shards --index-only s3://...` builds the indexes from the shards' bytes once and
    puts them beside the shards; with credentials that may only read, it says the indexes
    stay in the cache, and a run finds them there."""
    from hvdtrain.data import make_shards, remote
    from hvdtrain.data.shards import open_shards
    from hvdtrain.data.upload import index_bucket

    folder = shardwriter_set(str(tmp_path / "wds"), n=120, per=40)
    with S3Server(users={"admin": ["s3:*"], "reader": ["s3:List*", "s3:Get*"]}) as s3:
        s3.upload(folder, "hvd-idx", "ro/")
        s3.upload(folder, "hvd-idx", "rw/", create=False)
        env_for(monkeypatch, {"s3": s3})
        out = make_shards.index_only("s3://hvd-idx/rw/")
        assert "3 .idx uploaded beside the shards" in out, out
        names = sorted(o["Key"] for o in s3.client().list_objects_v2(Bucket="hvd-idx", Prefix="rw/")["Contents"])
        assert names == [f"rw/train-00000{i}.{e}" for i in range(3) for e in ("idx", "tar")]
        for k, v in s3.env(user="reader").items():
            monkeypatch.setenv(k, v)
        remote._STORES.clear()
        lines = []
        out = index_bucket("s3://hvd-idx/ro/", log=lines.append)
        assert "0 .idx uploaded beside the shards; the indexes stay in the cache" in out, out
        assert any("cannot write beside the shards" in x and "AccessDenied" in x for x in lines), lines
        assert open_shards("s3://hvd-idx/ro/").where == {"cache": 3}

