"""What hvdtrain asks of an object store, whichever it is: `Obj` (an object as a run
listed it), `RemoteError` (kinds: auth, missing, changed, transient, gone, usage, space),
the `Store` interface (`data.store_s3`, `data.store_gcs`), request counters, and
`retrying`: a failing request retried with backoff, resumed from the byte it reached,
until `retry_s` seconds pass with no progress. Credentials never appear here: a URL that
carries them is refused (`refuse_credentials_in`) and shown redacted.
"""
from __future__ import annotations

import base64
import functools
import hashlib
import json
import random
import re
import threading
import time
from dataclasses import asdict, dataclass, field

from hvdtrain.data.files import write_atomic
from hvdtrain.data.tarindex import ShardError

_USERINFO = re.compile(r"^([a-z][a-z0-9+.-]*://)([^/@\s]+)@", re.I)
RETRY_S = 60.0        # default: seconds without a byte of progress before a read fails
BACKOFF_MAX_S = 5.0


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

    @functools.cached_property
    def sig(self) -> str:
        """The cache key: bucket, key, size and ETag/generation."""
        return hashlib.sha256(f"{self.url}\n{self.size}\n{self.etag}".encode()).hexdigest()[:32]

    @property
    def name(self) -> str:
        return self.url.rsplit("/", 1)[-1]

    def to_dict(self) -> dict:
        return asdict(self)


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


def retrying(store, call, url: str, what: str, retry_s: float = RETRY_S, log=None, progress=None):
    """`call()` until it returns; a transient failure is retried with backoff until
    `retry_s` seconds pass with no progress (`progress()`: bytes reached, when the call
    resumes a read). Permanent failures (credentials, missing, replaced) raise at once."""
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
        retrying(self, lambda: self.read(obj, got(), obj.size, sink) if obj.size else None, obj.url, "GET",
                 retry_s, progress=got)
        return b"".join(parts[k] for k in sorted(parts))


def missing_client(scheme: str, module: str, e: ImportError) -> RemoteError:
    return RemoteError(f"{scheme}:// data needs the {module} package ({e}): install hvdtrain's remote extra, "
                       f"`pip install -e .[remote]` (make setup installs it)", kind="usage")


def write_json_atomic(path: str, data: dict) -> None:
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
