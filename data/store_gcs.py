"""`gs://` through google-cloud-storage: Google Cloud Storage, or an emulator.

Credentials are Application Default Credentials (`GOOGLE_APPLICATION_CREDENTIALS`, gcloud's
ADC file, the metadata server); with `STORAGE_EMULATOR_HOST` set the client talks to that
emulator anonymously. Reads are ranged downloads pinned to the listed generation
(`if_generation_match`), and every whole shard is checked against the MD5 the store keeps.
Uploads are resumable uploads of 64 MiB chunks.
"""
from __future__ import annotations

import base64
import os
import threading

from hvdtrain.data.store import COUNTERS, Obj, RemoteError, Store, Transient, missing_client, retrying, split_url

CHUNK_BYTES = 64 << 20


class _Sink:
    """A file-like object that hands what is written to `sink(offset, bytes)`."""

    def __init__(self, sink, pos: int):
        self.sink, self.pos = sink, pos

    def write(self, b) -> int:
        b = bytes(b)
        self.sink(self.pos, b)
        self.pos += len(b)
        COUNTERS.add(nbytes=len(b))
        return len(b)

    def flush(self) -> None:
        pass


class GCSStore(Store):
    scheme = "gs"

    def __init__(self):
        try:
            from google.cloud import storage  # noqa: F401
        except ImportError as e:
            raise missing_client("gs", "google-cloud-storage", e) from None
        self.emulator = os.environ.get("STORAGE_EMULATOR_HOST", "")
        self._local = threading.local()
        self._source = None

    def client(self):
        """One client per thread (the client's HTTP session is not shared across threads)."""
        c = getattr(self._local, "client", None)
        if c is None:
            from google.cloud import storage

            if self.emulator:
                c = storage.Client()  # anonymous, project-less: the emulator
            else:
                import google.auth

                creds, project = google.auth.default(scopes=["https://www.googleapis.com/auth/devstorage.read_write"])
                c = storage.Client(credentials=creds, project=project)
            self._local.client = c
        return c

    def credential_source(self) -> str:
        if self.emulator:
            return f"the emulator at {self.emulator} (STORAGE_EMULATOR_HOST), anonymous"
        if self._source is None:
            try:
                import google.auth

                creds, _ = google.auth.default()
                kind = type(creds).__module__ + "." + type(creds).__name__
                if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
                    self._source = f"Application Default Credentials: the key file in GOOGLE_APPLICATION_CREDENTIALS ({kind})"
                elif "compute_engine" in kind:
                    self._source = "Application Default Credentials: the metadata server"
                else:
                    self._source = f"Application Default Credentials ({kind})"
            except Exception as e:  # noqa: BLE001 - DefaultCredentialsError and kin: named, never shown in full
                return (f"Application Default Credentials: none found ({type(e).__name__}: GOOGLE_APPLICATION_CREDENTIALS "
                        f"unset or unreadable, no gcloud ADC file, no metadata server); for an emulator set "
                        f"STORAGE_EMULATOR_HOST")
        return self._source

    def classify(self, e: BaseException, url: str, what: str) -> RemoteError | None:
        import google.api_core.exceptions as ge
        import google.auth.exceptions as gae

        if isinstance(e, RemoteError):
            return e
        if isinstance(e, gae.DefaultCredentialsError):
            return RemoteError(f"{url}: {what}: no Google credentials; {self.credential_source()}", kind="auth")
        if isinstance(e, (ge.TooManyRequests, ge.ServiceUnavailable, ge.InternalServerError, ge.GatewayTimeout,
                          ge.BadGateway)):
            return Transient(f"{e.code} {type(e).__name__}")
        if isinstance(e, ge.PreconditionFailed):
            return RemoteError(f"{url} was replaced while this run read it (its generation is no longer the one the "
                               f"run listed and indexed): refused; start the run again to index the new object",
                               kind="changed")
        if isinstance(e, (ge.Forbidden, ge.Unauthorized, gae.RefreshError)):
            return RemoteError(f"{url}: {what} refused ({type(e).__name__}); {self.credential_source()}", kind="auth")
        if isinstance(e, ge.NotFound):
            return RemoteError(f"{url}: {what}: not found (no such bucket or object); {self.credential_source()}",
                               kind="missing")
        if isinstance(e, ge.GoogleAPICallError):
            return RemoteError(f"{url}: {what} failed: {type(e).__name__}: {str(e)[:200]}", kind="auth")
        if isinstance(e, (gae.TransportError, ConnectionError, TimeoutError)):
            return Transient(type(e).__name__, str(e)[:200])
        try:
            import requests.exceptions as re_

            if isinstance(e, re_.RequestException):
                return Transient(type(e).__name__, str(e)[:200])
        except ImportError:
            pass
        try:
            import google.resumable_media.common as rm

            if isinstance(e, rm.InvalidResponse):
                status = getattr(e.response, "status_code", 0)
                if status in (429, 500, 502, 503, 504):
                    return Transient(f"{status} {type(e).__name__}")
                if status == 412:
                    return self.classify(ge.PreconditionFailed("412"), url, what)
                if status == 404:
                    return self.classify(ge.NotFound("404"), url, what)
                return RemoteError(f"{url}: {what} failed: HTTP {status}", kind="auth")
        except ImportError:
            pass
        return None

    @staticmethod
    def _obj(bucket: str, blob) -> Obj:
        return Obj(f"gs://{bucket}/{blob.name}", int(blob.size or 0), str(blob.generation), blob.md5_hash or "")

    def list(self, url: str) -> list[Obj]:
        _, bucket, prefix = split_url(url)

        def listing():
            blobs = self.client().list_blobs(bucket, prefix=prefix, delimiter="/")
            return [self._obj(bucket, b) for b in blobs]
        return retrying(self, listing, url, "LIST")

    def head(self, url: str) -> Obj:
        _, bucket, key = split_url(url)

        def get():
            blob = self.client().bucket(bucket).get_blob(key)
            if blob is None:
                raise RemoteError(f"{url}: HEAD: not found (no such bucket or object); {self.credential_source()}",
                                  kind="missing")
            return self._obj(bucket, blob)
        return retrying(self, get, url, "HEAD")

    def read(self, obj: Obj, start: int, end: int, sink) -> None:
        _, bucket, key = split_url(obj.url)
        COUNTERS.add(gets=1)
        out = _Sink(sink, start)
        blob = self.client().bucket(bucket).blob(key)
        blob.download_to_file(out, start=start, end=end - 1, raw_download=True, checksum=None,
                              if_generation_match=int(obj.etag) if obj.etag.isdigit() else None, retry=None)
        if out.pos != end:
            raise Transient("short read", f"{out.pos - start} of {end - start} bytes")

    def put_file(self, path: str, url: str, metadata: dict | None = None) -> Obj:
        _, bucket, key = split_url(url)

        def put():
            blob = self.client().bucket(bucket).blob(key, chunk_size=CHUNK_BYTES)
            if metadata:
                blob.metadata = metadata
            blob.upload_from_filename(path)
        retrying(self, put, url, "PUT")
        return self.head(url)


def md5_b64(data: bytes) -> str:
    import hashlib

    return base64.b64encode(hashlib.md5(data).digest()).decode()
