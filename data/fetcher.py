"""The node's one fetcher: a thread in whichever process holds the cache's `fetcher.lock`.

Every tick it reads what the node's processes want (`wants/*.json`, their reading order,
pins, and what they are blocked on), keeps the soonest-needed objects that fit in the
bound, downloads the missing ones (ranged GETs of `part_mb` MiB, `workers` at once, each
resumed from the byte reached after a failure), and evicts only objects outside that set
and unpinned: objects nobody wants first (least recently completed), then the ones needed
last. So a shard is fetched once per epoch when the cache is smaller than the data set,
and never again when it holds it all. A copy is written under `.part-<pid>` (space
reserved first, with fallocate), checked (size, and MD5 where the store keeps one) and
renamed: a reader never sees a torn shard. An object that cannot be fetched gets an
`.err` file with the reason, which the waiting processes raise.
"""
from __future__ import annotations

import errno
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

from hvdtrain.data import remote, store
from hvdtrain.data.files import pid_alive
from hvdtrain.data.store import Obj, RemoteError

TICK_S = 0.05
TOO_SMALL_S = 10.0   # a process blocked this long on objects the pins leave no room for: "cache too small"


class _Job:
    """One object being downloaded: its part file, parts left, the first error."""

    def __init__(self, obj: Obj, path: str):
        self.obj, self.path = obj, path
        self.fd = -1
        self.parts_left = 0
        self.error: RemoteError | None = None
        self.lock = threading.Lock()
        self.t0 = time.monotonic()


class Fetcher:
    def __init__(self, cache, lock_fd: int):
        self.cache, self.lock_fd = cache, lock_fd
        self.objects = os.path.join(cache.root, "objects")
        self.opts = cache.options
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = ThreadPoolExecutor(max_workers=max(1, self.opts.workers), thread_name_prefix="hvdtrain-get")
        self.jobs: dict[str, _Job] = {}
        self.have: dict[str, int] = {}          # sig -> bytes of complete copies
        self.done_at: dict[str, float] = {}     # sig -> when completed or last pinned (LRU among the unwanted)
        self.blocked_since: dict[str, float] = {}
        self.stats = self._load_stats()
        self.full_note = ""  # set when the disk filled up before the bound
        self._read: dict[str, tuple] = {}  # wants files parsed at the last tick, by path (_read_wants)
        self._last_stats = 0.0

    # ---------------------------------------------------------------- lifecycle
    def start(self) -> None:
        self._clean_parts()
        self._thread = threading.Thread(target=self._run, name="hvdtrain-fetcher", daemon=True)
        self._thread.start()
        self._log(f"data: this process is the node's fetcher ({self.cache.describe()}, {self.opts.workers} "
                  f"concurrent GETs of {self.opts.part_mb} MiB)")

    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self._pool.shutdown(wait=False, cancel_futures=True)
        self._save_stats(force=True)
        os.close(self.lock_fd)  # releases the lock: another process may take over

    def _log(self, line: str) -> None:
        if self.cache.log:
            self.cache.log(line)

    def _clean_parts(self) -> None:
        """Part files are an earlier fetcher's (this one holds the lock: no other writes):
        they go; complete copies are counted."""
        for e in os.scandir(self.objects):
            if ".part-" in e.name:
                try:
                    os.remove(e.path)
                except FileNotFoundError:
                    pass
            elif e.name.endswith(".tar"):
                self.have[e.name[:-4]] = e.stat().st_size
                self.done_at[e.name[:-4]] = e.stat().st_mtime

    # ---------------------------------------------------------------- stats
    def _load_stats(self) -> dict:
        s = self.cache.stats()
        base = {"shards": 0, "bytes": 0, "gets": 0, "retries": 0, "evicted": 0, "evicted_bytes": 0, "failed": 0}
        return {**base, **{k: v for k, v in s.items() if k in base}}

    def _save_stats(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_stats < 1.0:
            return
        self._last_stats = now
        c = store.COUNTERS.snapshot()
        out = {**self.stats, "gets": self.stats["gets"] + c["gets"] - self._gets0,
               "retries": self.stats["retries"] + c["retries"] - self._retries0, "time": time.time(),
               "fetcher_pid": os.getpid(), "bound_bytes": self.cache.bound,
               "held_bytes": sum(self.have.values())}
        store.write_json_atomic(os.path.join(self.cache.root, "stats.json"), out)

    # ---------------------------------------------------------------- the loop
    def _run(self) -> None:
        c = store.COUNTERS.snapshot()
        self._gets0, self._retries0 = c["gets"], c["retries"]
        while not self._stop.is_set():
            try:
                self._tick()
            except Exception as e:  # noqa: BLE001 - a bug here must not leave every rank waiting silently
                self._log(f"data: the node's fetcher failed: {type(e).__name__}: {e}")
                raise
            self._save_stats()
            self._stop.wait(TICK_S)

    def _wants(self) -> tuple[list[Obj], set[str], set[str]]:
        """(objects in need order, pinned sigs, sigs a process is blocked on), over the
        node's live processes."""
        best: dict[str, tuple[float, Obj]] = {}
        pinned, waiting = set(), set()
        folder = os.path.join(self.cache.root, "wants")
        read: dict[str, tuple] = {}
        for e in os.scandir(folder):
            got = self._read_wants(e)
            if got is None:
                continue
            read[e.path] = got
            w, channels = got[1], got[2]
            if not self._live(w, e.path):
                continue
            for held, rest, chan_waiting in channels:
                for obj in held:
                    pinned.add(obj.sig)
                    best[obj.sig] = (-1.0, obj)
                # positions count the channel's pinned objects too: a reader that has pinned its
                # next window is no nearer to the one after than a reader that has not yet
                for i, obj in enumerate(rest, start=len(held)):
                    if obj.sig not in best or best[obj.sig][0] > i:
                        best[obj.sig] = (float(i), obj)
                waiting.update(chan_waiting)
        self._read = read
        return [o for _, o in sorted(best.values(), key=lambda x: x[0])], pinned, waiting

    def _read_wants(self, e: os.DirEntry) -> tuple | None:
        """A wants file as (stat, its JSON, per channel (pinned objects, wanted objects not
        pinned, waiting sigs)); parsed again only when it changed (the fetcher ticks every
        TICK_S, the readers rewrite theirs once a window)."""
        try:
            st = e.stat()
            stamp = (st.st_ino, st.st_mtime_ns, st.st_size)
            old = self._read.get(e.path)
            if old is not None and old[0] == stamp:
                return old
            with open(e.path) as f:
                w = json.load(f)
        except (OSError, ValueError):
            return None
        channels = []
        for ch in w["channels"].values():
            held = [Obj(**o) for o in ch["pinned"]]
            sigs = {o.sig for o in held}
            channels.append((held, [o for o in map(lambda x: Obj(**x), ch["want"]) if o.sig not in sigs],
                             ch["waiting"]))
        return stamp, w, channels

    def _live(self, w: dict, path: str) -> bool:
        if w.get("host") == self.cache.host:
            if pid_alive(int(w["pid"])):
                return True
            try:
                os.remove(path)  # a dead process's wants
            except FileNotFoundError:
                pass
            return False
        return time.time() - float(w.get("time", 0)) < 300  # another host sharing the folder

    def _tick(self) -> None:
        self._reap()
        order, pinned, waiting = self._wants()
        # what may stay: the soonest-needed that fit the bound; what is fetched: those that fit
        # one object's size less, so an object at the edge is not fetched, evicted and fetched
        # again as the readers' windows turn (pins come and go by a shard or two)
        margin = max((o.size for o in order), default=0)
        keep, total, fetch_n = [], 0, 0
        for o in order:
            if total + o.size > self.cache.bound and o.sig not in pinned:
                break
            keep.append(o)
            total += o.size
            fetch_n += total <= self.cache.bound - margin or o.sig in pinned
        keep_sigs = {o.sig for o in keep}
        for o in keep[:max(fetch_n, 1)]:
            if o.sig in self.have or o.sig in self.jobs or os.path.exists(self._err(o)):
                if o.sig in pinned:
                    self.done_at[o.sig] = time.time()
                continue
            if len(self.jobs) >= self.opts.workers:
                break
            if not self._make_room(o.size, keep_sigs | pinned, {x.sig: i for i, x in enumerate(order)}):
                break
            if not self._start(o):
                break
        self._check_stuck(order, pinned, waiting, keep_sigs)

    def _make_room(self, need: int, protected: set[str], position: dict[str, int]) -> bool:
        """Evict unprotected copies until `need` more bytes fit under the bound: unwanted
        ones first (least recently used), then those needed last."""
        used = sum(self.have.values()) + sum(j.obj.size for j in self.jobs.values())
        if used + need <= self.cache.bound:
            return True
        free = [s for s in self.have if s not in protected]
        unwanted = sorted((s for s in free if s not in position), key=lambda s: self.done_at.get(s, 0))
        needed_last = sorted((s for s in free if s in position), key=lambda s: -position[s])
        for s in unwanted + needed_last:
            if used + need <= self.cache.bound:
                break
            used -= self._evict(s)
        return used + need <= self.cache.bound

    def _evict(self, sig: str) -> int:
        size = self.have.pop(sig, 0)
        self.done_at.pop(sig, None)
        try:
            os.remove(os.path.join(self.objects, f"{sig}.tar"))
        except FileNotFoundError:
            pass
        self.stats["evicted"] += 1
        self.stats["evicted_bytes"] += size
        return size

    def _check_stuck(self, order, pinned, waiting, keep_sigs) -> None:
        """A process blocked on an object that does not fit beside the pinned ones, with
        nothing downloading: the cache is too small for the windows being read."""
        now = time.monotonic()
        by_sig = {o.sig: o for o in order}
        for sig in waiting:
            if sig in self.have or sig in self.jobs or sig not in by_sig:
                self.blocked_since.pop(sig, None)
                continue
            t = self.blocked_since.setdefault(sig, now)
            if now - t > TOO_SMALL_S and not self.jobs:
                o = by_sig[sig]
                held = sum(self.have.get(s, 0) for s in pinned | set(self.jobs))
                why = f"; {self.full_note}" if self.full_note else ""
                self._fail(o, RemoteError(
                    f"{o.url}: the shard cache is too small: its bound is {gb(self.cache.bound)} "
                    f"({self.cache.root}{why}) and the windows the readers on this node hold take {gb(held)}, "
                    f"with {o.size / 1e6:.2f} MB more needed; raise --data.cache_gb (or free disk space) or lower "
                    f"--data.window_shards", kind="space"))
                self.blocked_since.pop(sig, None)

    # ---------------------------------------------------------------- one object
    def _err(self, o: Obj) -> str:
        return os.path.join(self.objects, f"{o.sig}.err")

    def _start(self, o: Obj) -> bool:
        """Start downloading `o`; False when its space could not be reserved."""
        job = _Job(o, os.path.join(self.objects, f"{o.sig}.tar.part-{os.getpid()}"))
        try:
            job.fd = os.open(job.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
            if o.size:
                os.posix_fallocate(job.fd, 0, o.size)  # the space, now: a full disk shows here, not mid-shard
        except OSError as e:
            self._drop_part(job)
            if e.errno != errno.ENOSPC:
                self._fail(o, RemoteError(f"{o.url}: cannot write its copy in {self.cache.root}: {e.strerror}",
                                          kind="space"))
                return True
            held = sum(self.have.values()) + sum(j.obj.size for j in self.jobs.values())
            if held < self.cache.bound:  # the disk is fuller than the bound assumed: the bound shrinks to what fits
                self.full_note = (f"the disk of {self.cache.root} filled up at {held / 1e9:.2f} GB (no space left "
                                  f"for {o.url}, {o.size / 1e6:.1f} MB)")
                self._log(f"data: {self.full_note}: the cache's bound is now {gb(held)}")
                self.cache.bound = held
            return False
        part = max(1, self.opts.part_mb) << 20
        ranges = [(a, min(a + part, o.size)) for a in range(0, o.size, part)] or [(0, 0)]
        job.parts_left = len(ranges)
        self.jobs[o.sig] = job
        for a, b in ranges:
            self._pool.submit(self._part, job, a, b)
        return True

    def _part(self, job: _Job, start: int, end: int) -> None:
        pos = [start]

        def sink(off: int, data: bytes) -> None:
            if job.error is not None or self._stop.is_set():
                raise RemoteError("cancelled", kind="usage")
            os.pwrite(job.fd, data, off)
            pos[0] = off + len(data)
        try:
            if end > start:
                st = remote.store_for(job.obj.url)
                store.retrying(st, lambda: st.read(job.obj, pos[0], end, sink), job.obj.url, "GET",
                                self.opts.retry_s, self._log, progress=lambda: pos[0])
        except RemoteError as e:
            with job.lock:
                job.error = job.error or e
        except Exception as e:  # noqa: BLE001 - named in the error file, never lost
            with job.lock:
                job.error = job.error or RemoteError(f"{job.obj.url}: GET failed: {type(e).__name__}: {e}")
        with job.lock:
            job.parts_left -= 1

    def _reap(self) -> None:
        """Finish the jobs whose parts are all done: check, rename, or fail."""
        for sig, job in list(self.jobs.items()):
            if job.parts_left > 0:
                continue
            del self.jobs[sig]
            if job.error is not None:
                self._drop_part(job)
                if job.error.kind != "usage" or not self._stop.is_set():
                    self._fail(job.obj, job.error)
                continue
            self._complete(job)

    def _complete(self, job: _Job) -> None:
        o = job.obj
        size = os.fstat(job.fd).st_size
        os.fdatasync(job.fd)
        os.close(job.fd)
        job.fd = -1
        if size != o.size or not store.md5_matches(job.path, o):
            self._drop_part(job)
            why = f"{size} bytes for {o.size} listed" if size != o.size else "its MD5 differs from the store's"
            self._fail(o, RemoteError(f"{o.url}: the copy does not match the object the run listed ({why}): it was "
                                      f"replaced during the run, or damaged in transit; refused", kind="changed"))
            return
        os.replace(job.path, os.path.join(self.objects, f"{o.sig}.tar"))
        self.have[o.sig], self.done_at[o.sig] = o.size, time.time()
        self.stats["shards"] += 1
        self.stats["bytes"] += o.size
        dt = time.monotonic() - job.t0
        if self.stats["shards"] <= 3 or self.stats["shards"] % 100 == 0:
            self._log(f"data: fetched {o.url} ({o.size / 1e6:.1f} MB in {dt:.2f} s; {self.stats['shards']} shard(s), "
                      f"{self.stats['bytes'] / 1e9:.2f} GB so far)")

    def _drop_part(self, job: _Job) -> None:
        if job.fd >= 0:
            os.close(job.fd)
            job.fd = -1
        try:
            os.remove(job.path)
        except FileNotFoundError:
            pass

    def _fail(self, o: Obj, e: RemoteError) -> None:
        self.stats["failed"] += 1
        self._log(f"data: the fetcher gave up: {e}")
        store.write_json_atomic(self._err(o), {"url": o.url, "message": str(e), "kind": e.kind, "time": time.time()})


def gb(n: float) -> str:
    return f"{n / 1e9:.3g} GB"
