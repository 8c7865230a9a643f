"""Real object-storage servers for the tests, each its own process on 127.0.0.1 with a
free port: moto's S3 server (`moto_server`, DALI's own S3 tests use it the same way) and
`gcp-storage-emulator`, optionally behind the fault proxy (`tests.faultproxy`).

    with S3Server() as s3: ...          # s3.endpoint, s3.env(), s3.client(), s3.gets()
    with GCSServer() as gcs: ...        # gcs.env(), gcs.client()
    with FaultProxy(s3) as fp: ...      # fp.env(), fp.faults(slowdown=0.1), fp.down(20), fp.stats()

Endpoints are IP literals (path-style addressing, as DALI needs). The servers log each
request line to their log file, so requests can be counted.
"""
from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

BIN = os.path.dirname(sys.executable)
KEY_ID, SECRET = "AKIDHVDTRAINTEST", "hvdtrain-test-secret-not-real"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, p: subprocess.Popen, log: str, timeout_s: float = 30) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if p.poll() is not None:
            raise RuntimeError(f"server exited ({p.returncode}): {open(log).read()[-2000:]}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    p.kill()
    raise RuntimeError(f"server did not listen on {port} within {timeout_s} s: {open(log).read()[-2000:]}")


class _Process:
    """A server process of the test's own: killed on stop, and when its `with` block ends."""
    proc: subprocess.Popen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(_Process):
    def __init__(self, cmd: list[str], port: int, env: dict | None = None):
        self.port = port
        self.dir = tempfile.mkdtemp(prefix="hvdtrain-store-")
        self.log = os.path.join(self.dir, "server.log")
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL, env={**os.environ, **(env or {})},
                                     start_new_session=True)
        _wait_listening(port, self.proc, self.log)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"


    def upload(self, folder: str, bucket: str, prefix: str, create: bool = True) -> list[str]:
        """The folder's files as `prefix<name>` objects (the bucket made first with `create`)."""
        if create:
            self.create(bucket)
        keys = []
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                self.put(path, bucket, f"{prefix}{name}")
                keys.append(f"{prefix}{name}")
        return keys

    def requests(self, method: str = "GET") -> int:
        """Request lines of `method` in the server's log so far (werkzeug colours them)."""
        line_re = re.compile(rf'"(?:\x1b\[[0-9;]*m)*{method} ')
        with open(self.log, errors="replace") as f:
            return sum(bool(line_re.search(line)) for line in f)


class S3Server(_Server):
    """moto's S3 server. `auth=True`: every request's access key is checked (none exists:
    any key is refused), for the wrong-credentials test. `users={name: [actions]}`: IAM
    users with those S3 actions are made first, then every request is checked against
    them (`env(user=...)`, `client(user=...)`; `client()` is the first user's)."""

    def __init__(self, auth: bool = False, users: dict | None = None):
        port = free_port()
        env = {"INITIAL_NO_AUTH_ACTION_COUNT": str(3 * len(users or {}))} if (auth or users) else {}
        super().__init__([os.path.join(BIN, "moto_server"), "-H", "127.0.0.1", "-p", str(port)], port, env)
        self.keys = {None: (KEY_ID, SECRET)}
        for name, actions in (users or {}).items():
            self.keys[name] = self._user(name, actions)
        if users:
            self.keys[None] = self.keys[next(iter(users))]

    def _user(self, name: str, actions: list[str]) -> tuple[str, str]:
        """An IAM user allowed `actions` on everything (three requests, before auth is on)."""
        import boto3

        iam = boto3.client("iam", endpoint_url=self.endpoint, aws_access_key_id="setup",
                           aws_secret_access_key="setup", region_name="us-east-1")
        iam.create_user(UserName=name)
        key = iam.create_access_key(UserName=name)["AccessKey"]
        iam.put_user_policy(UserName=name, PolicyName="s3", PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": "*"}]}))
        return key["AccessKeyId"], key["SecretAccessKey"]

    def env(self, endpoint: str | None = None, user: str | None = None) -> dict:
        key_id, secret = self.keys[user]
        return {"AWS_ENDPOINT_URL": endpoint or self.endpoint, "AWS_ACCESS_KEY_ID": key_id,
                "AWS_SECRET_ACCESS_KEY": secret, "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_EC2_METADATA_DISABLED": "true"}

    def client(self, user: str | None = None):
        import boto3

        key_id, secret = self.keys[user]
        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=key_id,
                            aws_secret_access_key=secret, region_name="us-east-1")

    def create(self, bucket: str) -> None:
        self.client().create_bucket(Bucket=bucket)

    def put(self, path: str, bucket: str, key: str) -> None:
        self.client().upload_file(path, bucket, key)


class GCSServer(_Server):
    """gcp-storage-emulator (in memory); google-cloud-storage and DALI find it through
    STORAGE_EMULATOR_HOST / DALI_GCS_ENDPOINT_URL."""

    def __init__(self):
        port = free_port()
        super().__init__([os.path.join(BIN, "gcp-storage-emulator"), "start", "-H", "127.0.0.1", "--port",
                          str(port), "--in-memory"], port)

    def env(self, endpoint: str | None = None) -> dict:
        return {"STORAGE_EMULATOR_HOST": endpoint or self.endpoint}

    def client(self):
        from google.cloud import storage

        old = os.environ.get("STORAGE_EMULATOR_HOST")
        os.environ["STORAGE_EMULATOR_HOST"] = self.endpoint
        try:
            return storage.Client()
        finally:
            if old is None:
                del os.environ["STORAGE_EMULATOR_HOST"]
            else:
                os.environ["STORAGE_EMULATOR_HOST"] = old

    def create(self, bucket: str) -> None:
        self.client().create_bucket(bucket)

    def put(self, path: str, bucket: str, key: str) -> None:
        self.client().bucket(bucket).blob(key).upload_from_filename(path)


class FaultProxy(_Process):
    """tests.faultproxy in front of `server`, as its own process."""

    def __init__(self, server: _Server):
        self.server = server
        d = tempfile.mkdtemp(prefix="hvdtrain-proxy-")
        ports = os.path.join(d, "ports.json")
        self.log = os.path.join(d, "proxy.log")
        self.proc = subprocess.Popen([sys.executable, "-m", "tests.faultproxy", "--upstream",
                                      f"127.0.0.1:{server.port}", "--ports-file", ports],
                                     cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                     stdout=open(self.log, "w"), stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 30
        while not os.path.exists(ports):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the fault proxy did not start: {open(self.log).read()[-2000:]}")
            time.sleep(0.05)
        got = json.load(open(ports))
        self.port, self.control = got["port"], got["control"]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def env(self) -> dict:
        return self.server.env(self.endpoint)

    def _post(self, path: str, body: dict) -> dict:
        req = urllib.request.Request(f"http://127.0.0.1:{self.control}{path}", data=json.dumps(body).encode(),
                                     method="POST")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    def faults(self, **kw) -> None:
        self._post("/faults", kw)

    def down(self, seconds: float) -> None:
        self._post("/down", {"seconds": seconds})

    def stats(self) -> dict:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.control}/stats", timeout=10) as r:
            return json.loads(r.read())

