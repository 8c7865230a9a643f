"""`s3://` through boto3: AWS S3 and S3-compatible stores (MinIO, Ceph RGW, R2).

The endpoint is `AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`), credentials and region the
SDK's standard chain: the environment's keys, `AWS_PROFILE` with a credentials file, an
instance or container role. Reads are ranged GETs with `If-Match` on the listed ETag;
botocore's own retries are off for them (`data.remote.retrying` retries from the byte
reached, counts and logs each retry). Uploads use boto3's transfer manager (multipart
above 64 MiB, parts in parallel).
"""
from __future__ import annotations

import os
import threading

from hvdtrain.data.store import COUNTERS, Obj, RemoteError, Store, Transient, missing_client, retrying, split_url

PART_BYTES = 64 << 20
_TRANSIENT_CODES = {"SlowDown", "ServiceUnavailable", "InternalError", "RequestTimeout", "Throttling",
                    "ThrottlingException", "RequestTimeTooSkewed", "503", "500", "502", "504"}
_AUTH_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
               "AuthorizationHeaderMalformed", "AllAccessDisabled", "403", "401"}
_MISSING_CODES = {"NoSuchBucket", "NoSuchKey", "404", "NotFound"}


class S3Store(Store):
    scheme = "s3"

    def __init__(self):
        try:
            import boto3
            import botocore.config
        except ImportError as e:
            raise missing_client("s3", "boto3", e) from None
        self._session = boto3.session.Session()
        self._lock = threading.Lock()
        self._clients: dict[str, object] = {}
        self._config = botocore.config.Config
        self.endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or ""

    def client(self, reads: bool = False):
        """One client per kind (thread-safe): reads without botocore's retries (ours resume
        from the byte reached), the rest with its standard retries."""
        kind = "reads" if reads else "calls"
        with self._lock:
            if kind not in self._clients:
                retries = {"mode": "standard", "total_max_attempts": 1} if reads else {"mode": "standard"}
                cfg = self._config(retries=retries, max_pool_connections=64, connect_timeout=10, read_timeout=30)
                self._clients[kind] = self._session.client("s3", config=cfg)
            return self._clients[kind]

    # ---------------------------------------------------------------- what the run is told
    def credential_source(self) -> str:
        where = f"endpoint {self.endpoint} (AWS_ENDPOINT_URL)" if self.endpoint else "AWS's endpoint"
        try:
            creds = self._session.get_credentials()
        except Exception as e:  # noqa: BLE001 - a broken profile file, say: named, never shown
            return f"{where}; credentials: the SDK's chain failed ({type(e).__name__})"
        if creds is None:
            return (f"{where}; credentials: none found (the SDK's chain: environment, AWS_PROFILE with a "
                    f"credentials file, instance role)")
        method = {"env": "the environment (AWS_ACCESS_KEY_ID)",
                  "shared-credentials-file": f"the shared credentials file, profile {self._session.profile_name}",
                  "config-file": f"the config file, profile {self._session.profile_name}",
                  "iam-role": "the instance role (EC2 metadata)", "container-role": "the container role",
                  "assume-role": "an assumed role"}.get(creds.method, creds.method)
        return f"{where}; credentials from {method}"

    def classify(self, e: BaseException, url: str, what: str) -> RemoteError | None:
        import botocore.exceptions as be

        if isinstance(e, RemoteError):
            return e
        inner = e.__cause__ or e.__context__
        if type(e).__name__ == "S3UploadFailedError" and inner is not None:  # the transfer manager's wrapper
            return self.classify(inner, url, what)
        if isinstance(e, be.NoCredentialsError):
            return RemoteError(f"{url}: {what}: no AWS credentials ({self.credential_source()})", kind="auth")
        if isinstance(e, be.ClientError):
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code in _TRANSIENT_CODES or status.startswith("5"):
                return Transient(f"{status or '?'} {code}".strip())
            if code == "PreconditionFailed" or status == "412":
                return RemoteError(f"{url} was replaced while this run read it (its ETag is no longer the one the "
                                   f"run listed and indexed): refused; start the run again to index the new "
                                   f"object", kind="changed")
            if code in _AUTH_CODES or status in ("401", "403"):
                return RemoteError(f"{url}: {what} refused: {code} ({err.get('Message', '')}); "
                                   f"{self.credential_source()}", kind="auth")
            if code in _MISSING_CODES or status == "404":
                _, bucket, _ = split_url(url)
                thing = f"bucket {bucket}" if code == "NoSuchBucket" else "object"
                return RemoteError(f"{url}: {what}: no such {thing} ({code}); {self.credential_source()}",
                                   kind="missing")
            return RemoteError(f"{url}: {what} failed: {code} {err.get('Message', '')} (HTTP {status})", kind="auth")
        if isinstance(e, (be.EndpointConnectionError, be.ConnectionClosedError, be.ReadTimeoutError,
                          be.ConnectTimeoutError, be.ResponseStreamingError, be.HTTPClientError)):
            return Transient(type(e).__name__, str(e)[:200])
        if isinstance(e, (ConnectionError, TimeoutError)):
            return Transient(type(e).__name__, str(e)[:200])
        try:
            import urllib3.exceptions as ue
            if isinstance(e, (ue.HTTPError,)):
                return Transient(type(e).__name__, str(e)[:200])
        except ImportError:
            pass
        return None

    # ---------------------------------------------------------------- the calls
    def list(self, url: str) -> list[Obj]:
        """Objects directly under the folder `url` (ends with /), not below it."""
        _, bucket, prefix = split_url(url)
        out = []

        def page(token):
            kw = {"Bucket": bucket, "Prefix": prefix, "Delimiter": "/"}
            if token:
                kw["ContinuationToken"] = token
            return self.client().list_objects_v2(**kw)
        token = None
        while True:
            r = retrying(self, lambda: page(token), url, "LIST")
            out += [Obj(f"s3://{bucket}/{c['Key']}", int(c["Size"]), c["ETag"]) for c in r.get("Contents", [])]
            token = r.get("NextContinuationToken")
            if not r.get("IsTruncated") or not token:
                return out

    def head(self, url: str) -> Obj:
        _, bucket, key = split_url(url)
        r = retrying(self, lambda: self.client().head_object(Bucket=bucket, Key=key), url, "HEAD")
        return Obj(url, int(r["ContentLength"]), r["ETag"])

    def read(self, obj: Obj, start: int, end: int, sink) -> None:
        """Bytes [start, end) into `sink(offset, chunk)`, as they arrive: a retry resumes
        from the byte reached."""
        _, bucket, key = split_url(obj.url)
        COUNTERS.add(gets=1)
        r = self.client(reads=True).get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}",
                                               IfMatch=obj.etag)
        pos = start
        for chunk in r["Body"].iter_chunks(256 << 10):
            sink(pos, chunk)
            pos += len(chunk)
            COUNTERS.add(nbytes=len(chunk))
        if pos != end:
            raise Transient("short read", f"{pos - start} of {end - start} bytes")

    def put_file(self, path: str, url: str, metadata: dict | None = None) -> Obj:
        from boto3.s3.transfer import TransferConfig

        _, bucket, key = split_url(url)
        cfg = TransferConfig(multipart_threshold=PART_BYTES, multipart_chunksize=PART_BYTES, max_concurrency=8)
        extra = {"Metadata": metadata} if metadata else None
        retrying(self, lambda: self.client().upload_file(path, bucket, key, ExtraArgs=extra, Config=cfg), url, "PUT")
        return self.head(url)
