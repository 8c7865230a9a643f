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

import base64
import hashlib
import os
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field

from data.tarindex import ShardError

SCHEMES = ("s3://", "gs://")
_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@\s]+)@", re.I)
RETRY_S = 60.0        # default: seconds without a byte of progress before a read fails
BACKOFF_MAX_S = 5.0


def is_remote(spec: str) -> bool:
    return str(spec).startswith(SCHEMES)


def redact(text: str) -> str:
    """`scheme://user:key@host/...` -> `scheme://***@host/...` (what an error may show)."""
    return _USERINFO.sub(r"\1***@", text)


def refuse_credentials_in(value: str, what: str) -> None:
    """A URL carrying credentials is refused: secrets belong to the providers' chains."""
    if _USERINFO.match(value or ""):
        raise RemoteError(f"{what}={redact(value)}: a URL carrying credentials is refused (they would be "
                          f"written into logs and config.json). Use the provider's standard chain: "
                          f"AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE for S3, Application "
                          f"Default Credentials for GCS", kind="usage")


def check_environment() -> None:
    """Endpoints from the environment must not carry credentials either."""
    for var in ("AWS_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "STORAGE_EMULATOR_HOST", "DALI_GCS_ENDPOINT_URL"):
        refuse_credentials_in(os.environ.get(var, ""), var)


def split_url(url: str) -> tuple[str, str, str]:
    """`s3://bucket/a/b.tar` -> ("s3", "bucket", "a/b.tar")."""
    refuse_credentials_in(url, "--data")
    scheme, rest = url.split("://", 1)
    bucket, _, key = rest.partition("/")
    if not bucket:
        raise RemoteError(f"{url}: no bucket in the URL (expected {scheme}://BUCKET/PREFIX/)", kind="usage")
    return scheme, bucket, key


class RemoteError(ShardError):
    """A remote read or listing that cannot go on; the message names the URL.
    `kind`: auth | missing | changed | transient | gone | usage | space."""

    def __init__(self, message: str, kind: str = "transient"):
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Obj:
    """One object as the run listed it: what every read is checked against."""
    url: str
    size: int
    etag: str            # S3: the ETag; GCS: the generation
    md5: str = ""        # GCS: base64 MD5 of the whole object, when the store keeps one

    @property
    def sig(self) -> str:
        """The cache key: bucket, key, size and ETag/generation."""
        return hashlib.sha256(f"{self.url}\n{self.size}\n{self.etag}".encode()).hexdigest()[:32]

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def to_dict(self) -> dict:
        return asdict(self)


_KNOWN: dict[str, Obj] = {}  # url -> Obj as listed in this process (cache keys of remote shards)


def remember(objs) -> None:
    for o in objs:
        _KNOWN[o.url] = o


def known(url: str) -> Obj:
    try:
        return _KNOWN[url]
    except KeyError:
        raise RemoteError(f"{url}: not listed in this process (open the shards first)", kind="usage") from None


@dataclass
class Counters:
    """Requests and retries of this process's reads (thread-safe)."""
    gets: int = 0
    bytes: int = 0
    retries: int = 0
    by_reason: dict = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, gets: int = 0, nbytes: int = 0) -> None:
        with self.lock:
            self.gets += gets
            self.bytes += nbytes

    def retry(self, reason: str) -> int:
        with self.lock:
            self.retries += 1
            self.by_reason[reason] = self.by_reason.get(reason, 0) + 1
            return self.retries

    def snapshot(self) -> dict:
        with self.lock:
            return {"gets": self.gets, "bytes": self.bytes, "retries": self.retries,
                    "retry_reasons": dict(self.by_reason)}


COUNTERS = Counters()


def retrying(call, url: str, what: str, retry_s: float = RETRY_S, log=None, progress=None):
    """`call()` until it returns; a transient failure is retried with backoff until
    `retry_s` seconds pass with no progress (`progress()`: bytes reached, when the call
    resumes a read). Permanent failures (credentials, missing, replaced) raise at once."""
    store = store_for(url)
    t_progress, reached, attempt = time.monotonic(), progress() if progress else 0, 0
    while True:
        try:
            return call()
        except Exception as e:  # noqa: BLE001 - classified below; anything unknown is re-raised
            err = store.classify(e, url, what)
            if err is None:
                raise
            if err.kind != "transient":
                raise err from None
            now = time.monotonic()
            if progress is not None and progress() > reached:
                reached, t_progress, attempt = progress(), now, 0
            if now - t_progress > retry_s:
                raise RemoteError(f"{url}: {what} failed for {retry_s:.0f} s with no progress (the store is gone or "
                                  f"unreachable: {err}); raise --data.remote_retry_s to wait longer",
                                  kind="gone") from None
            attempt += 1
            n = COUNTERS.retry(err.reason)
            if log and (n <= 3 or n % 50 == 0):
                at = f" from byte {progress()}" if progress else ""
                log(f"data: {url}: {err.reason}; retrying{at} (retry {n} in this process)")
            time.sleep(min(BACKOFF_MAX_S, 0.05 * 2 ** min(attempt, 8)) * random.uniform(0.5, 1.0))


class Transient(RemoteError):
    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}{': ' + detail if detail else ''}", kind="transient")
        self.reason = reason


# ---------------------------------------------------------------- stores
class Store:
    """What hvdtrain asks of a store. `list` -> objects directly under a prefix; `read`
    streams a byte range into `sink(offset, bytes)`; `put_file` uploads."""
    scheme = ""

    def list(self, url: str) -> list[Obj]: ...
    def head(self, url: str) -> Obj: ...
    def read(self, obj: Obj, start: int, end: int, sink) -> None: ...
    def put_file(self, path: str, url: str, metadata: dict | None = None) -> Obj: ...
    def credential_source(self) -> str: ...
    def classify(self, e: BaseException, url: str, what: str) -> RemoteError | None: ...

    def get_bytes(self, obj: Obj, retry_s: float = RETRY_S) -> bytes:
        """A whole small object (`_info.json`, an `.idx`), checked like any read."""
        parts: dict[int, bytes] = {}

        def sink(off, b):
            parts[off] = b
        got = lambda: sum(map(len, parts.values()))  # noqa: E731
        retrying(lambda: self.read(obj, got(), obj.size, sink) if obj.size else None, obj.url, "GET", retry_s,
                 progress=got)
        return b"".join(parts[k] for k in sorted(parts))


_STORES: dict[str, Store] = {}
_STORES_LOCK = threading.Lock()


def store_for(url: str) -> Store:
    scheme = url.split("://", 1)[0]
    with _STORES_LOCK:
        if scheme not in _STORES:
            check_environment()
            if scheme == "s3":
                from data.store_s3 import S3Store
                _STORES[scheme] = S3Store()
            elif scheme == "gs":
                from data.store_gcs import GCSStore
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


def missing_client(scheme: str, module: str, e: ImportError) -> RemoteError:
    return RemoteError(f"{scheme}:// data needs the {module} package ({e}): install hvdtrain's remote extra, "
                       f"`pip install -e .[remote]` (make setup installs it)", kind="usage")


def write_json_atomic(path: str, data: dict) -> None:
    import json

    from data.tarindex import write_atomic

    write_atomic(path, json.dumps(data).encode())


def md5_matches(path: str, obj: Obj) -> bool:
    """True when the store keeps no MD5 (S3's ETag is not always one) or the file has it."""
    if not obj.md5:
        return True
    h = hashlib.md5()
    with open(path, "rb") as f:
        while chunk := f.read(8 << 20):
            h.update(chunk)
    return base64.b64encode(h.digest()).decode() == obj.md5


# ---------------------------------------------------------------- specs
def resolve(spec: str) -> tuple[list[Obj], dict[str, Obj]]:
    """(tar objects in name order, {name: Obj} of the other objects beside them) for a
    prefix (`s3://b/p/`: every *.tar directly under it), one tar, or a brace pattern.
    An empty prefix, a missing shard or a compressed one is an error naming the URL."""
    from data.shards import expand_braces
    from data.tarindex import compressed_error, compression_of_name

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
