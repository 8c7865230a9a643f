"""A node's cache of whole shards from a bucket, filled ahead of the reader.

    cache = nodecache.get(options)              # one per process and cache folder
    cache.want("train", objs)                   # what this process reads next, in order
    paths = cache.fetch("train", objs)          # wait until complete, pinned; local paths
    cache.release("train", objs)                # unpinned: the pipeline that read them is gone

DALI opens every path it is given when its pipeline is built, so the loader hands it
windows of shards that are already here (`hvdtrain.loader`), and says ahead of time
which windows come next. One process per node is the fetcher (`data.fetcher`: whoever
holds `fetcher.lock`; if it dies, a waiting process takes over): it merges what every
process on the node wants, downloads the soonest-needed shards with large ranged GETs in
parallel, each under a temporary name, checks it and renames it when complete, and
evicts shards nobody needs soon, never one a reader holds, so the folder never exceeds
its bound. Layout under `--data.cache_dir`:

    objects/<sig>.tar             complete, checked copies (sig: bucket, key, size, ETag/generation)
    objects/<sig>.tar.part-<pid>  a copy being written: never handed to a reader
    objects/<sig>.err             why an object could not be fetched: the waiting ranks raise it
    wants/<host>-<pid>.json       one process's pinned and wanted objects, in reading order
    fetcher.lock                  held by the node's fetcher (flock: released when it dies)
    stats.json                    the node's counters: shards, bytes, GETs, retries, evictions
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import socket
import threading
import time
from dataclasses import dataclass

from hvdtrain.data.store import Obj, RemoteError
from hvdtrain.data.files import write_atomic

DEFAULT_BOUND_GB = 100.0
WAIT_POLL_S = 0.02


@dataclass(frozen=True)
class Options:
    """How a node caches bucket data (`--data.cache_dir`, `--data.cache_gb`, ...)."""
    mode: str = "cache"          # cache | direct (DALI reads the bucket itself)
    cache_dir: str = ""          # "" = $HVDTRAIN_SHARD_CACHE, else $TMPDIR (or /tmp)/hvdtrain-shards-$USER
    cache_gb: float = 0.0        # 0 = min(100 GB, half of the free space of that disk)
    workers: int = 8             # concurrent ranged GETs of the node's fetcher
    part_mb: int = 16            # bytes per ranged GET, MiB
    retry_s: float = 60.0        # a request failing this long with no progress fails the read

    def folder(self) -> str:
        if self.cache_dir:
            return os.path.abspath(self.cache_dir)
        if os.environ.get("HVDTRAIN_SHARD_CACHE"):
            return os.path.abspath(os.environ["HVDTRAIN_SHARD_CACHE"])
        user = os.environ.get("USER") or str(os.getuid())  # users of one node do not share a folder
        return os.path.join(os.environ.get("TMPDIR") or "/tmp", f"hvdtrain-shards-{user}")

    def bound_bytes(self, folder: str, held: int = 0) -> int:
        if self.cache_gb > 0:
            return int(self.cache_gb * 1e9)
        free = shutil.disk_usage(folder).free + held
        return int(min(DEFAULT_BOUND_GB * 1e9, free / 2))


class NodeCache:
    """This process's side of the node's cache: publish wants, wait for objects, pin them."""

    def __init__(self, options: Options, log=None):
        self.options, self.log = options, log
        self.root = options.folder()
        for sub in ("objects", "wants"):
            os.makedirs(os.path.join(self.root, sub), exist_ok=True)
        self.bound = options.bound_bytes(self.root, self._held())
        self.host, self.pid = socket.gethostname(), os.getpid()
        self.started = time.time()
        self._lock = threading.Lock()
        self._channels: dict[str, dict] = {}
        self._fetcher = None
        self._wants_path = os.path.join(self.root, "wants", f"{self.host}-{self.pid}.json")

    def _held(self) -> int:
        d = os.path.join(self.root, "objects")
        return sum(e.stat().st_size for e in os.scandir(d) if e.name.endswith(".tar"))

    def describe(self) -> str:
        return f"cache {self.root}, bound {self.bound / 1e9:.3g} GB"

    # ---------------------------------------------------------------- paths
    def path_of(self, obj: Obj) -> str:
        return os.path.join(self.root, "objects", f"{obj.sig}.tar")

    def _err_path(self, obj: Obj) -> str:
        return os.path.join(self.root, "objects", f"{obj.sig}.err")

    # ---------------------------------------------------------------- wants and pins
    def _channel(self, name: str) -> dict:
        return self._channels.setdefault(name, {"want": [], "pinned": {}, "waiting": []})

    def want(self, channel: str, objs: list[Obj]) -> None:
        """What `channel` reads next, soonest first (replaces its earlier list)."""
        with self._lock:
            self._channel(channel)["want"] = list(dict.fromkeys(objs))
            self._publish()

    def release(self, channel: str, objs) -> None:
        with self._lock:
            pins = self._channel(channel)["pinned"]
            for o in objs:
                if pins.get(o.sig, (0, None))[0] > 1:
                    pins[o.sig] = (pins[o.sig][0] - 1, o)
                else:
                    pins.pop(o.sig, None)
            self._publish()

    def close_channel(self, channel: str) -> None:
        with self._lock:
            self._channels.pop(channel, None)
            self._publish()

    def _publish(self) -> None:
        chans = {k: {"want": [o.to_dict() for o in c["want"]], "pinned": [o.to_dict() for _, o in c["pinned"].values()],
                     "waiting": c["waiting"]} for k, c in self._channels.items()}
        data = {"pid": self.pid, "host": self.host, "time": time.time(), "channels": chans}
        write_atomic(self._wants_path, json.dumps(data).encode())

    def close(self) -> None:
        """This process wants nothing more; a fetcher running here stops."""
        with self._lock:
            self._channels.clear()
            try:
                os.remove(self._wants_path)
            except FileNotFoundError:
                pass
        if self._fetcher is not None:
            self._fetcher.stop()
            self._fetcher = None

    # ---------------------------------------------------------------- waiting
    def fetch(self, channel: str, objs: list[Obj], beat=None) -> list[str]:
        """Local paths of `objs`, once all are complete here; they stay pinned (never
        evicted) until `release`. Raises RemoteError with the fetcher's reason."""
        objs = list(objs)
        with self._lock:
            c = self._channel(channel)
            for o in objs:
                n, _ = c["pinned"].get(o.sig, (0, None))
                c["pinned"][o.sig] = (n + 1, o)
            self._clear_stale_errors(objs)
            waiting = [o.sig for o in objs if not os.path.exists(self.path_of(o))]
            c["waiting"] = c["waiting"] + waiting
            self._publish()
        try:
            self._wait(objs, beat)
        except BaseException:
            self.release(channel, objs)
            raise
        finally:
            with self._lock:
                c = self._channel(channel)
                for sig in waiting:
                    c["waiting"].remove(sig)
                self._publish()
        return [self.path_of(o) for o in objs]

    def _clear_stale_errors(self, objs) -> None:
        """An error left by an earlier run (older than this process's cache) is retried."""
        for o in objs:
            p = self._err_path(o)
            try:
                if os.path.getmtime(p) < self.started:
                    os.remove(p)
            except FileNotFoundError:
                pass

    def _wait(self, objs: list[Obj], beat=None) -> None:
        todo = [o for o in objs if not os.path.exists(self.path_of(o))]
        poll, t_log = WAIT_POLL_S, time.monotonic()
        while todo:
            self.ensure_fetcher()
            for o in todo:
                err = self._err_path(o)
                if os.path.exists(err):
                    raise self._error(err, o)
            todo = [o for o in todo if not os.path.exists(self.path_of(o))]
            if not todo:
                return
            if beat is not None:
                beat()
            if self.log and time.monotonic() - t_log > 60:
                t_log = time.monotonic()
                self.log(f"data: waiting for {len(todo)} shard(s) from the node's fetcher ({todo[0].url}, ...)")
            time.sleep(poll)
            poll = min(0.2, poll * 1.5)

    def _error(self, path: str, obj: Obj) -> RemoteError:
        try:
            with open(path) as f:
                rec = json.load(f)
            return RemoteError(rec["message"], kind=rec.get("kind", "transient"))
        except (OSError, ValueError, KeyError):
            return RemoteError(f"{obj.url}: the node's fetcher could not fetch it (see {path})")

    def ensure_fetcher(self) -> None:
        """Become the node's fetcher if none is running (its lock is free)."""
        if self._fetcher is not None and self._fetcher.alive():
            return
        fd = os.open(os.path.join(self.root, "fetcher.lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            return
        from hvdtrain.data.fetcher import Fetcher

        self._fetcher = Fetcher(self, fd)
        self._fetcher.start()

    # ---------------------------------------------------------------- what the node did
    def stats(self) -> dict:
        try:
            with open(os.path.join(self.root, "stats.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return {}


class Watch:
    """The largest the shard copies in a cache folder got, sampled every `every_s` seconds
    (a bench's and a test's check that the bound held)."""

    def __init__(self, folder: str, every_s: float = 0.002):
        self.objects, self.every_s, self.max = os.path.join(folder, "objects"), every_s, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.max = max(self.max, sum(e.stat().st_size for e in os.scandir(self.objects) if ".tar" in e.name))
            except OSError:
                pass  # a copy renamed or evicted between the listing and its stat
            time.sleep(self.every_s)

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        return self.max


_CACHES: dict[str, NodeCache] = {}
_CACHES_LOCK = threading.Lock()
_LAST: list[Options] = []  # the options the process last opened bucket data with


def get(options: Options, log=None) -> NodeCache:
    """This process's NodeCache for `options`' folder (one per folder)."""
    folder = options.folder()
    with _CACHES_LOCK:
        _LAST[:] = [options]
        if folder not in _CACHES:
            _CACHES[folder] = NodeCache(options, log)
        elif log and _CACHES[folder].log is None:
            _CACHES[folder].log = log
        return _CACHES[folder]


@contextlib.contextmanager
def local_copy(tar: str, options: Options | None = None):
    """`tar` at a local path: itself, or (a bucket URL) its complete copy in the node's
    cache, pinned while the block runs. `options`: default, the ones bucket data was last
    opened with in this process."""
    from hvdtrain.data import remote

    if not remote.is_remote(tar):
        yield tar
        return
    obj = remote.known(tar)
    nc = get(options or (_LAST[0] if _LAST else Options()))
    path = nc.fetch("local", [obj])[0]
    try:
        yield path
    finally:
        nc.release("local", [obj])


def close_all() -> None:
    with _CACHES_LOCK:
        for c in _CACHES.values():
            c.close()
        _CACHES.clear()


def _forked() -> None:
    """A forked child (a pool worker) is a process of its own: its own wants file, and
    the fetcher thread of its parent does not run in it."""
    _CACHES.clear()


os.register_at_fork(after_in_child=_forked)
