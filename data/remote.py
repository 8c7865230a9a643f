"""Shards in object storage: `s3://` (AWS S3 and S3-compatible stores: MinIO, Ceph RGW,
R2) and `gs://` (Google Cloud Storage), through the stores' own clients (boto3,
google-cloud-storage; `pip install -e .[remote]`).

    --data.train=s3://bucket/imagenet/train/                      # every *.tar directly under it
    --data.train=s3://bucket/imagenet/train-{000000..001023}.tar  # a brace pattern
    --data.train=gs://bucket/tiny/train/

Endpoints and credentials come only from the providers' standard chains, never from a
flag: S3 reads `AWS_ENDPOINT_URL` (an S3-compatible store), the environment's keys,
`AWS_PROFILE` with a credentials file, or an instance role; GCS reads Application
Default Credentials, or `STORAGE_EMULATOR_HOST` for an emulator. A URL that carries
credentials (`https://user:key@host`) is refused without being echoed. Errors name the
URL and the credential source used (`credential_source`), never a secret.

Every read is a ranged GET checked against the ETag (S3, `If-Match`) or generation and
MD5 (GCS) the object had when the run listed it: a replaced object is refused by name,
never read at a stale offset. A failing request (503 SlowDown, a reset connection, the
server gone) is retried with backoff from the byte it reached, for `retry_s` seconds
without progress; then the read fails naming the URL.
"""
from __future__ import annotations

import os
import threading

from hvdtrain.data.store import (COUNTERS, Obj, RemoteError, Store, Transient, redact, refuse_credentials_in,  # noqa: F401
                        retrying, split_url)

SCHEMES = ("s3://", "gs://")


def is_remote(spec: str) -> bool:
    return str(spec).startswith(SCHEMES)


def check_environment() -> None:
    """Endpoints from the environment must not carry credentials either."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST", "DALI_GCS_ENDPOINT_URL"):
        refuse_credentials_in(os.environ.get(var, ""), var)


_KNOWN: dict[str, Obj] = {}  # url -> Obj as listed in this process (cache keys of remote shards)


def remember(objs) -> None:
    for o in objs:
        _KNOWN[o.url] = o


def known(url: str) -> Obj:
    try:
        return _KNOWN[url]
    except KeyError:
        raise RemoteError(f"{url}: not listed in this process (open the shards first)", kind="usage") from None


# ---------------------------------------------------------------- stores
_STORES: dict[str, Store] = {}
_STORES_LOCK = threading.Lock()


def store_for(url: str) -> Store:
    scheme = url.split("://", 1)[0]
    with _STORES_LOCK:
        if scheme not in _STORES:
            check_environment()
            if scheme == "s3":
                from hvdtrain.data.store_s3 import S3Store
                _STORES[scheme] = S3Store()
            elif scheme == "gs":
                from hvdtrain.data.store_gcs import GCSStore
                _STORES[scheme] = GCSStore()
            else:
                raise RemoteError(f"{redact(url)}: unsupported scheme (hvdtrain reads s3:// and gs://)", kind="usage")
        return _STORES[scheme]


def dali_environment() -> None:
    """DALI's own reader (`--data.remote=direct`) reads `AWS_ENDPOINT_URL` itself; for GCS
    it wants DALI_GCS_ENDPOINT_URL (and DALI_GCS_ANONYMOUS for an emulator): taken from
    STORAGE_EMULATOR_HOST, the variable google-cloud-storage uses, when set."""
    emu = os.environ.get("STORAGE_EMULATOR_HOST")
    if emu and not os.environ.get("DALI_GCS_ENDPOINT_URL"):
        os.environ["DALI_GCS_ENDPOINT_URL"] = emu
        os.environ.setdefault("DALI_GCS_ANONYMOUS", "1")


def _forked() -> None:
    _STORES.clear()  # HTTP connection pools are not shared with a forked child


os.register_at_fork(after_in_child=_forked)


# ---------------------------------------------------------------- specs
def resolve(spec: str) -> tuple[list[Obj], dict[str, Obj]]:
    """(tar objects in name order, {name: Obj} of the other objects beside them) for a
    prefix (`s3://b/p/`: every *.tar directly under it), one tar, or a brace pattern.
    An empty prefix, a missing shard or a compressed one is an error naming the URL."""
    from hvdtrain.data.records import expand_braces
    from hvdtrain.data.tarindex import compressed_error, compression_of_name

    split_url(spec)
    store = store_for(spec)
    urls = expand_braces(spec)
    folders = sorted({u.rsplit("/", 1)[0] + "/" for u in urls}) if not spec.endswith("/") else [spec]
    listed: dict[str, Obj] = {}
    for folder in folders:
        listed.update({o.url: o for o in store.list(folder)})
    if spec.endswith("/"):
        tars = [o for u, o in sorted(listed.items()) if u.endswith(".tar")]
        if not tars:
            packed = [u for u in sorted(listed) if compression_of_name(u)]
            if packed:
                raise compressed_error(packed[0], compression_of_name(packed[0]),
                                       f" ({len(packed)} compressed shard(s) under {spec}, no .tar)")
            others = ", ".join(o.rsplit("/", 1)[-1] for o in sorted(listed)[:5])
            raise RemoteError(f"{spec}: no .tar objects directly under this prefix ({len(listed)} other "
                              f"object(s){': ' + others if others else ''})", kind="missing")
    else:
        for u in urls:
            if compression_of_name(u):
                raise compressed_error(u, compression_of_name(u))
        missing = [u for u in urls if u not in listed]
        if missing:
            more = f" (and {len(missing) - 3} more)" if len(missing) > 3 else ""
            raise RemoteError(f"{spec}: {len(missing)} of {len(urls)} shard(s) missing: {', '.join(missing[:3])}{more}",
                              kind="missing")
        tars = [listed[u] for u in urls]
    remember(listed.values())
    tar_urls = {o.url for o in tars}
    beside = {o.name: o for o in listed.values() if o.url not in tar_urls}
    return tars, beside
