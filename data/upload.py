"""Shards into a bucket: `data.make_shards SRC s3://bucket/prefix/` (or `gs://`) and
`data.make_shards --index-only s3://bucket/prefix/train/`.

Shards are written as a local build writes them, into a staging folder (`--staging`,
default under the cache), and each is uploaded as soon as it is finished, while the
workers write the next: the tar (multipart, parts in parallel), then its `.idx`; then
the local copy goes, and the shard's record in `<split>/.parts/` says it was uploaded,
with the object's ETag/generation. `_info.json` is uploaded last, after every shard of
its split, and `classes.txt` after every split: a prefix that has `_info.json` is
complete. A killed build run again keeps what is in the bucket as recorded and builds
and uploads the rest.
"""
from __future__ import annotations

import hashlib
import json
import os

from hvdtrain.data import cache, remote
from hvdtrain.data.store import RemoteError
from hvdtrain.data.files import write_atomic
from hvdtrain.data.wds import INFO_NAME, index_path_for


class Uploader:
    def __init__(self, out: str, staging: str = "", part_path=None):
        """`part_path(split_dir, name)`: where make_shards keeps a finished shard's record."""
        self.out = out if out.endswith("/") else out + "/"
        self.part_path = part_path
        remote.split_url(self.out)
        self.store = remote.store_for(self.out)
        key = hashlib.sha256(self.out.encode()).hexdigest()[:16]
        self.staging = os.path.abspath(staging or os.path.join(os.path.dirname(cache.path("staging", "x")), key))
        os.makedirs(self.staging, exist_ok=True)
        self._listed: dict[str, dict] = {}
        self.uploaded = self.kept = 0

    def for_split(self, split: str):
        return lambda split_dir, part: self.shard(split, split_dir, part)

    def _listing(self, split: str) -> dict:
        if split not in self._listed:
            self._listed[split] = {o.name: o for o in self.store.list(f"{self.out}{split}/")}
        return self._listed[split]

    def shard(self, split: str, split_dir: str, part: dict | None) -> dict | None:
        """Upload one finished shard (tar, then .idx) unless the bucket holds it as recorded;
        `part` None: the split is done, upload its _info.json."""
        if part is None:
            self.put(os.path.join(split_dir, INFO_NAME), f"{split}/{INFO_NAME}")
            return None
        rec = part["record"]
        if not rec.get("samples"):
            return part
        name, up = rec["name"], part.get("uploaded")
        have = self._listing(split).get(name)
        if up and have is not None and have.size == rec["bytes"] and have.etag == up["etag"]:
            self.kept += 1
            return part
        tar = os.path.join(split_dir, name)
        if not os.path.exists(tar):
            os.remove(self.part_path(split_dir, name))  # recorded as uploaded, but not in the bucket as it was
            raise RemoteError(f"{self.out}{split}/{name}: recorded as uploaded but the bucket does not hold it as "
                              f"uploaded; run the build again to write and upload it anew", kind="missing")
        obj = self.store.put_file(tar, f"{self.out}{split}/{name}", {"sha256": rec.get("sha256", "")})
        self.put(index_path_for(tar), f"{split}/{name[:-4]}.idx")
        part = {**part, "uploaded": {"etag": obj.etag, "url": obj.url}}
        write_atomic(self.part_path(split_dir, name), json.dumps(part, sort_keys=True).encode())
        for p in (tar, index_path_for(tar)):
            os.remove(p)
        self.uploaded += 1
        return part

    def put(self, path: str, name: str):
        return self.store.put_file(path, f"{self.out}{name}")


def index_bucket(spec: str, index_dir: str = "", log=None) -> str:
    """Indexes of a bucket's shards, built once from their bytes (streamed in parallel into
    the node's shard cache) and uploaded beside them where the credentials allow;
    otherwise they stay in the cache (HVDTRAIN_CACHE), where runs on this machine find them."""
    import time

    from hvdtrain.data.shards import open_shards

    t0 = time.monotonic()
    shards = open_shards(spec, index_dir=index_dir, log=log)
    built, where = time.monotonic() - t0, dict(shards.where)
    _, beside = remote.resolve(spec)
    up = denied = 0
    for url, idx in zip(shards.paths, shards.index_paths):
        name = url.rsplit("/", 1)[-1][:-4] + ".idx"
        if name in beside:
            continue
        try:
            remote.store_for(url).put_file(idx, url.rsplit("/", 1)[0] + "/" + name)
            up += 1
        except RemoteError as e:
            if e.kind != "auth":
                raise
            denied += 1
            if log and denied == 1:
                log(f"data: cannot write beside the shards ({e}): the indexes stay in the cache, {cache.root()}")
            break
    stays = f"; the indexes stay in the cache ({cache.root()})" if denied else ""
    places = ", ".join(f"{n} {k}" for k, n in sorted(where.items()))
    return (f"{spec}: {len(shards.paths)} shard(s), {shards.total} samples indexed in {built:.1f} s (indexes: {places}); "
            f"{up} .idx uploaded beside the shards{stays}")
