"""The node's shard cache and its fetcher, against a real S3 server (moto, its own
process) and the fault proxy in front of it: the bound, eviction, one fetch per shard per
pass, resumed reads after 503s and resets, a replaced object, a store gone for good, a
full disk. No secret in any message."""
import hashlib
import os
import subprocess
import time

import pytest

from tests.stores import SECRET, FaultProxy, GCSServer, S3Server

MB = 1 << 20


@pytest.fixture(scope="module")
def s3():
    with S3Server() as server:
        c = server.client()
        c.create_bucket(Bucket="hvd-cache")
        for i in range(6):
            c.put_object(Bucket="hvd-cache", Key=f"set/s{i}.tar", Body=blob(i))
        yield server


def blob(i: int, size: int = MB) -> bytes:
    return hashlib.sha256(str(i).encode()).digest() * (size // 32)


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    from hvdtrain.data import fetcher, nodecache, remote

    remote._STORES.clear()
    remote._KNOWN.clear()
    monkeypatch.setattr(fetcher, "TOO_SMALL_S", 1.0)
    yield
    nodecache.close_all()
    remote._STORES.clear()


def use(monkeypatch, env: dict) -> None:
    for k, v in env.items():
        monkeypatch.setenv(k, v)


def passes(nc, tars, n_passes: int):
    """Read the objects in order, one at a time, as a loader reads windows: each fetched
    (pinned), then released; the fetcher told what comes next."""
    for _ in range(n_passes):
        for i, t in enumerate(tars):
            nc.want("train", tars[i + 1:] + tars)  # the rest of this pass, then the next
            path = nc.fetch("train", [t])[0]
            assert open(path, "rb").read(64) == blob(int(t.name[1]))[:64]
            nc.release("train", [t])


def test_the_bound_holds_and_each_shard_is_fetched_once_per_pass(s3, fresh, monkeypatch, tmp_path):
    """A cache of 2.5 shards over 6: never above its bound, every shard fetched at most
    once per pass (6, then at most 6 more: the two that fit and are needed first in the
    next pass may stay), the ones read evicted. A cache that holds them all fetches nothing
    in the second pass."""
    from hvdtrain.data import nodecache, remote

    use(monkeypatch, s3.env())
    tars, _ = remote.resolve("s3://hvd-cache/set/")
    nc = nodecache.get(nodecache.Options(cache_dir=str(tmp_path / "small"), cache_gb=2.5 * MB / 1e9, part_mb=1))
    w = nodecache.Watch(nc.root)
    passes(nc, tars, 1)
    time.sleep(1.2)  # the fetcher writes its counters once a second
    first = nc.stats()["shards"]
    passes(nc, tars, 1)
    nc.close()
    top, st = w.stop(), nc.stats()
    assert top <= nc.bound, (top, nc.bound)
    assert first <= 6 + 2 and 10 <= st["shards"] <= 12 and st["bytes"] == st["shards"] * MB, (first, st)
    assert st["evicted"] >= st["shards"] - 2, st
    big = nodecache.get(nodecache.Options(cache_dir=str(tmp_path / "big"), cache_gb=1.0))
    passes(big, tars, 2)
    big.close()
    assert big.stats()["shards"] == 6 and big.stats()["evicted"] == 0


def test_reads_resume_from_the_byte_reached_after_503s_and_resets(s3, fresh, monkeypatch, tmp_path):
    """Every GET cut by a reset after 300 KiB, and a third answered 503 SlowDown: the copy
    completes, equal to the object, with no byte fetched twice; the retries are counted."""
    from hvdtrain.data import nodecache, remote

    with FaultProxy(s3) as fp:
        use(monkeypatch, fp.env())
        fp.faults(reset=1.0, reset_after=300 << 10, slowdown=0.3)
        tars, _ = remote.resolve("s3://hvd-cache/set/")
        before = remote.COUNTERS.snapshot()
        lines = []
        nc = nodecache.get(nodecache.Options(cache_dir=str(tmp_path / "c"), part_mb=1), log=lines.append)
        path = nc.fetch("t", tars[:2])
        after, proxy = remote.COUNTERS.snapshot(), fp.stats()
    assert [open(p, "rb").read() for p in path] == [blob(0), blob(1)]
    assert after["bytes"] - before["bytes"] == 2 * MB  # resumed, never restarted
    assert proxy["resets"] >= 4 and proxy["slowdowns"] >= 1
    assert after["retries"] - before["retries"] == proxy["resets"] + proxy["slowdowns"]
    assert any("503 SlowDown; retrying" in x for x in lines) and any("retrying from byte" in x for x in lines)


def test_a_store_gone_for_good_fails_the_read_naming_the_url_in_time(s3, fresh, monkeypatch, tmp_path):
    from hvdtrain.data import nodecache, remote
    from hvdtrain.data.remote import RemoteError

    with FaultProxy(s3) as fp:
        use(monkeypatch, fp.env())
        tars, _ = remote.resolve("s3://hvd-cache/set/")
        fp.down(-1)
        nc = nodecache.get(nodecache.Options(cache_dir=str(tmp_path / "c"), retry_s=2.0), log=print)
        t0 = time.monotonic()
        with pytest.raises(RemoteError, match=r"s3://hvd-cache/set/s0\.tar: GET failed for 2 s with no progress"):
            nc.fetch("t", tars[:1])
        took = time.monotonic() - t0
    assert took < 2.0 + 5.0, took  # the retry budget, plus the last backoff and a tick
    assert os.listdir(os.path.join(nc.root, "objects")) == [f"{tars[0].sig}.err"]  # no copy, torn or whole


def test_a_replaced_object_is_refused_by_name(s3, fresh, monkeypatch, tmp_path):
    """The run listed (and indexed) one object; the bucket now holds another under the same
    key: its reads are refused (S3: If-Match on the ETag; GCS: the MD5 of the copy), never
    read at the old offsets."""
    from hvdtrain.data import nodecache, remote
    from hvdtrain.data.remote import RemoteError

    use(monkeypatch, s3.env())
    tars, _ = remote.resolve("s3://hvd-cache/set/")
    s3.client().put_object(Bucket="hvd-cache", Key="set/s5.tar", Body=blob(50))
    try:
        nc = nodecache.get(nodecache.Options(cache_dir=str(tmp_path / "c")))
        with pytest.raises(RemoteError, match=r"s3://hvd-cache/set/s5\.tar was replaced while this run read it"):
            nc.fetch("t", tars[5:6])
    finally:
        s3.client().put_object(Bucket="hvd-cache", Key="set/s5.tar", Body=blob(5))
    with GCSServer() as gcs:
        use(monkeypatch, gcs.env())
        b = gcs.client().create_bucket("hvd-cache")
        b.blob("set/s0.tar").upload_from_string(blob(0))
        tars, _ = remote.resolve("gs://hvd-cache/set/")
        b.blob("set/s0.tar").upload_from_string(blob(7))  # same size, other bytes
        with pytest.raises(RemoteError, match=r"gs://hvd-cache/set/s0\.tar: the copy does not match the object the "
                                              r"run listed \(its MD5 differs"):
            nc.fetch("t", tars)


def test_wrong_credentials_are_named_with_their_source_never_the_secret(fresh, monkeypatch, tmp_path):
    from hvdtrain.data import remote
    from hvdtrain.data.remote import RemoteError

    with S3Server(auth=True) as server:
        use(monkeypatch, server.env())
        with pytest.raises(RemoteError) as e:
            remote.resolve("s3://hvd-cache/set/")
    msg = str(e.value)
    assert "s3://hvd-cache/set/: LIST refused: InvalidAccessKeyId" in msg
    assert "credentials from the environment (AWS_ACCESS_KEY_ID)" in msg and SECRET not in msg


@pytest.mark.skipif(os.geteuid() != 0, reason="mounts a small tmpfs (needs root)")
def test_a_full_disk_shrinks_the_bound_or_stops_saying_so(s3, fresh, monkeypatch, tmp_path):
    """The cache's disk holds 2.5 MB whatever its bound says (a 100 GB bound here): the
    fetcher evicts to fit, and a reader that needs more than the disk holds is told so."""
    from hvdtrain.data import nodecache, remote
    from hvdtrain.data.remote import RemoteError

    use(monkeypatch, s3.env())
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2600k", "tmpfs", str(disk)], check=True)
    try:
        tars, _ = remote.resolve("s3://hvd-cache/set/")
        lines = []
        nc = nodecache.get(nodecache.Options(cache_dir=str(disk / "c"), cache_gb=100.0), log=lines.append)
        passes(nc, tars, 1)
        assert any("filled up" in x and "the cache's bound is now" in x for x in lines), lines
        nc.want("t", tars)
        with pytest.raises(RemoteError, match=r"the shard cache is too small.*filled up"):
            nc.fetch("t", tars[:3])
        assert not [f for f in os.listdir(disk / "c" / "objects") if ".part" in f]
    finally:
        nodecache.close_all()
        subprocess.run(["umount", str(disk)], check=False)
