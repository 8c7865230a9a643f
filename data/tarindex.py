"""Tar shards at disk speed: a walk over the 512-byte headers, and DALI's index files.

A DALI webdataset index (`wds2idx` format v1.2) lists, per sample, its members:

    v1.2 <num_samples>
    <ext> <data_offset> <size> <member name> [<ext> <data_offset> <size> <name> ...]

`walk()` finds the members by reading only the tar headers (the data between them is
skipped, never read; `.cls` members, a few bytes each, are read on request), so it runs
at the speed of the page cache instead of `tarfile`'s Python object per member: 5-7x
faster than `tarfile` and DALI's `wds2idx` on the same tars (docs/benchmarks.md, "Data at
scale"). It reads ustar, GNU (`././@LongLink` names) and pax (`path=`, `size=`) headers.

Members belong to a sample by key (the name up to the first dot of its basename). They
are grouped by key over the whole tar, not only when adjacent: GNU `tar -cf x.tar -C dir .`
writes a folder in directory order, which scatters a sample's members (`./s3.cls`,
`./s1.JPEG`, `./s1.cls`, `./s3.JPEG`, ...); `wds2idx` then splits each sample in two and
DALI stops with "Underful sample". For tars whose members are adjacent (webdataset's,
`data.wds`'s) the index is byte-identical to `wds2idx`'s. A member name with whitespace would
break DALI's whitespace-separated index lines: its whitespace is %-encoded there.
"""
from __future__ import annotations

import contextlib
import mmap
import os
import re
import struct
from dataclasses import dataclass, field

from hvdtrain.data.files import write_atomic

BLOCK = 512
ZERO = bytes(BLOCK)
# DALI seeks to each sample's bytes: it reads plain tars only
COMPRESSED = {".tar.gz": "gzip", ".tgz": "gzip", ".tar.zst": "zstd", ".tar.zstd": "zstd", ".tzst": "zstd",
              ".tar.xz": "xz", ".txz": "xz", ".tar.bz2": "bzip2", ".tbz2": "bzip2", ".tbz": "bzip2",
              ".tar.lz4": "lz4"}
MAGIC = ((b"\x1f\x8b", "gzip"), (b"\x28\xb5\x2f\xfd", "zstd"), (b"\xfd7zXZ\x00", "xz"), (b"BZh", "bzip2"),
         (b"\x04\x22\x4d\x18", "lz4"))
DECOMPRESS = {"gzip": "gunzip -k {f}   (or: pigz -dk {f})", "zstd": "zstd -d {f}", "xz": "xz -dk {f}",
              "bzip2": "bunzip2 -k {f}", "lz4": "lz4 -d {f}"}
_HDR = struct.Struct("100s24x12s20xc100x6s82x155s")  # name, size, typeflag, magic, ustar prefix
_REGULAR = (0, 48, 55)  # typeflag NUL, '0', '7' (contiguous file)


class ShardError(ValueError):
    """A problem with shard files that the user must fix; the message names the file."""


def compression_of_name(path: str) -> str | None:
    low = path.lower()
    return next((kind for suffix, kind in COMPRESSED.items() if low.endswith(suffix)), None)


def compressed_error(path: str, kind: str, how: str = "") -> ShardError:
    """The message for a compressed shard: what it is and the command that decompresses it."""
    cmd = DECOMPRESS[kind].format(f=path)
    return ShardError(f"{path}: a {kind}-compressed tar{how}: DALI reads plain .tar shards only (it seeks to "
                      f"each sample's bytes). Decompress it once, next to the original or onto a disk you can "
                      f"write: `{cmd}`, then point --data.train at the .tar files")


def split_name(member: str) -> tuple[str, str]:
    """`dir/abc.seg.jpg` -> (`dir/abc`, `seg.jpg`): the extension starts at the first dot."""
    base_start = member.rfind("/") + 1
    dot = member.find(".", base_start)
    if dot < 0:
        return member, ""
    return member[:dot], member[dot + 1:]


def _octal(field: bytes) -> int:
    if field[0] & 0x80:  # GNU base-256 (members of 8 GiB and more)
        return int.from_bytes(field[1:], "big")
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _checksum_ok(h: bytes) -> bool:
    """Old (v7) headers carry no magic: their checksum tells a header from garbage."""
    try:
        stored = _octal(h[148:156])
    except ValueError:
        return False
    return stored == sum(h[:148]) + 256 + sum(h[156:])


def _pax(data: bytes) -> dict[str, str]:
    """`<len> key=value\\n` records of a pax extended header."""
    out, i = {}, 0
    while i < len(data):
        sp = data.find(b" ", i)
        if sp < 0:
            break
        n = int(data[i:sp])
        key, _, value = data[sp + 1:i + n - 1].partition(b"=")
        out[key.decode()] = value.decode("utf-8", "surrogateescape")
        i += n
    return out


@dataclass
class Walk:
    """One tar's samples: `samples[i]` = [(ext, data offset, size, member name), ...];
    `labels[i]` = the raw bytes of its `.cls` member (when asked for), else None."""
    path: str
    size: int
    samples: list[list[tuple[str, int, int, str]]] = field(default_factory=list)
    labels: list[bytes | None] = field(default_factory=list)
    error: str | None = None   # why a damaged tar stopped being readable (tolerant walks)
    end: int = 0               # offset just past the last member's data


def _first_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read(6)


def walk(path: str, read_exts: tuple[str, ...] = ("cls",), tolerant: bool = False) -> Walk:
    """Every sample of a plain tar from its headers alone. `read_exts`: members whose bytes
    (at most 64) are returned in `labels`. A damaged tar raises ShardError naming it, or
    (`tolerant`) returns the samples before the damage with `error` set."""
    size = os.path.getsize(path)
    w = Walk(path, size)
    if size == 0:
        return _fail(w, "empty file (0 bytes)", tolerant)
    head = _first_bytes(path)
    for magic, kind in MAGIC:
        if head.startswith(magic):
            raise compressed_error(path, kind, f" (its first bytes are {kind}'s magic {magic.hex(' ')})")
    with open(path, "rb") as f:
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        _walk_headers(mm, w, {e.lower() for e in read_exts})
    except _Damaged as e:
        return _fail(w, str(e), tolerant)
    finally:
        mm.close()
    return w


class _Damaged(Exception):
    pass


def _fail(w: Walk, why: str, tolerant: bool) -> Walk:
    if tolerant:
        w.error = why
        return w
    raise ShardError(f"{w.path}: not a readable tar ({why})")


def _walk_headers(mm, w: Walk, read_exts: set[str]) -> None:  # noqa: C901 - one loop over the header kinds
    size, pos = w.size, 0
    by_key: dict[str, int] = {}
    long_name, pax = None, {}
    while True:
        if pos + BLOCK > size:
            raise _Damaged(f"ReadError: it ends at byte {size} inside the header at {pos} (truncated)"
                           if pos < size else f"ReadError: no end-of-archive marker after byte {pos} (truncated)")
        name, sz, t, magic, prefix = _HDR.unpack_from(mm, pos)
        if (t == b"0" or t == b"\0") and long_name is None and not pax and not sz[0] & 0x80 and (
                magic == b"ustar " or (magic == b"ustar\0" and not prefix[0])):
            # the common member (a plain file, a short name): its fields straight from the mmap
            n = int(sz.split(b"\0", 1)[0].strip() or b"0", 8)
            data = pos + BLOCK
            if data + n > size:
                raise _Damaged(f"ReadError: member at byte {pos} needs {n} bytes, the tar ends at {size} (truncated)")
            _add(w, by_key, name.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"), data, n, mm, read_exts)
            w.end = data + n
            pos = data + (n + BLOCK - 1) // BLOCK * BLOCK
            continue
        h = mm[pos:pos + BLOCK]
        magic = h[257:263]
        if magic[:5] != b"ustar":
            if h == ZERO:
                return
            if not _checksum_ok(h):
                raise _Damaged(f"ReadError: invalid header at byte {pos}" + (" (the first block: not a tar)"
                                                                              if pos == 0 else ""))
        try:
            n = _octal(h[124:136])
        except ValueError:
            raise _Damaged(f"ReadError: invalid size field in the header at byte {pos}") from None
        t, data = h[156], pos + BLOCK
        nxt = data + (n + BLOCK - 1) // BLOCK * BLOCK
        if t in _REGULAR or t in (76, 120, 103):  # data must exist (L, x, g read it)
            if data + n > size:
                raise _Damaged(f"ReadError: member at byte {pos} needs {n} bytes, the tar ends at {size} (truncated)")
        if t == 76:    # 'L': GNU long name of the next member
            long_name = mm[data:data + n].split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
        elif t == 120:  # 'x': pax header of the next member
            pax = _pax(mm[data:data + n])
        elif t in _REGULAR:
            if "size" in pax:
                n = int(pax["size"])
                nxt = data + (n + BLOCK - 1) // BLOCK * BLOCK
            if long_name is not None:
                name = long_name
            elif "path" in pax:
                name = pax["path"]
            else:
                name = h[:100].split(b"\0", 1)[0]
                if magic == b"ustar\x00" and h[345] != 0:  # POSIX ustar: a prefix field
                    name = h[345:500].split(b"\0", 1)[0] + b"/" + name
                name = name.decode("utf-8", "surrogateescape")
            _add(w, by_key, name, data, n, mm, read_exts)
            w.end = data + n
            long_name, pax = None, {}
        else:          # directories, links, devices, global pax headers: not sample members
            if t != 103:
                long_name, pax = None, {}
        pos = nxt


def _add(w: Walk, by_key: dict[str, int], name: str, off: int, n: int, mm, read_exts: set[str]) -> None:
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    key, ext = (name, "") if dot < 0 else (name[:dot], name[dot + 1:])  # split_name, inlined: once per member
    if dot == slash or slash == len(name):
        return  # hidden files (".foo", "dir/._x"), bare folders: not samples, as in wds2idx
    i = by_key.get(key)
    if i is None or ext in [c[0] for c in w.samples[i]]:  # new key, or a second member of that ext
        i = by_key[key] = len(w.samples)
        w.samples.append([])
        w.labels.append(None)
    w.samples[i].append((ext, off, n, name))
    if read_exts and ext.lower() in read_exts:
        w.labels[i] = mm[off:off + min(n, 64)]


# ---------------------------------------------------------------- index files
_ODD = re.compile(r"[\s%]")


def _field(s: str) -> str:
    """DALI splits index lines on whitespace: %-encode it (and % itself) inside names."""
    return _ODD.sub(lambda m: f"%{ord(m.group()):02X}", s)


def index_text(samples: list[list[tuple[str, int, int, str]]]) -> str:
    body = "\n".join(" ".join(f"{e} {o} {s} {n}" for e, o, s, n in comps) for comps in samples)
    if _ODD.search(body.replace(" ", "").replace("\n", "")):  # rare: names with whitespace or %
        body = "\n".join(" ".join(f"{_field(e)} {o} {s} {_field(n)}" for e, o, s, n in comps) for comps in samples)
    return f"v1.2 {len(samples)}\n" + body + ("\n" if samples else "")


def write_index_rows(idx_path: str, samples: list[list[tuple[str, int, int, str]]]) -> int:
    """Write a wds2idx v1.2 index listing `samples` (atomically); returns their count."""
    write_atomic(idx_path, index_text(samples).encode("utf-8", "surrogateescape"))
    return len(samples)


def read_index(idx_path: str) -> list[list[tuple[str, int, int, str]]]:
    """The sample groups a wds2idx index lists (the inverse of write_index_rows)."""
    with open(idx_path, encoding="utf-8", errors="surrogateescape") as f:
        head = f.readline().split()
        rows = []
        for line in f:
            p = line.split()
            rows.append([(p[i], int(p[i + 1]), int(p[i + 2]), p[i + 3]) for i in range(0, len(p) - 3, 4)])
    if len(head) != 2 or not head[0].startswith("v1.") or int(head[1]) != len(rows):
        raise ShardError(f"{idx_path}: not a valid wds2idx index (header {' '.join(head)!r}, {len(rows)} rows)")
    return rows


def read_index_count(idx_path: str) -> int:
    with open(idx_path, "rb") as f:
        head = f.readline().split()
    if len(head) != 2 or not head[0].startswith(b"v1.") or not head[1].isdigit():
        raise ShardError(f"{idx_path}: not a DALI wds2idx index (first line {b' '.join(head)!r})")
    return int(head[1])


def _first_and_last_rows(idx_path: str) -> tuple[list[str], list[str]] | None:
    """The first and last sample lines of an index, read from its two ends (not the whole file)."""
    with open(idx_path, "rb") as f:
        f.readline()
        first = f.readline()
        if not first:
            return None
        end = f.seek(0, os.SEEK_END)
        f.seek(max(0, end - 65536))
        tail = f.read().rstrip(b"\n").rsplit(b"\n", 1)[-1]
    dec = lambda b: b.decode("utf-8", "surrogateescape").split()  # noqa: E731
    return dec(first), dec(tail)


def _header_name(h: bytes) -> str:
    name = h[:100].split(b"\0", 1)[0]
    if h[257:263] == b"ustar\x00" and h[345] != 0:
        name = h[345:500].split(b"\0", 1)[0] + b"/" + name
    return name.decode("utf-8", "surrogateescape")


def index_problem(tar_path: str, idx_path: str, opened=None) -> str | None:
    """Why an index does not describe its tar, or None. Judged by content, as a copy keeps
    it (not by mtimes): the first and last members it lists lie inside the tar and the tar
    headers there carry their names, and no sample member follows the last one it lists
    (a tar that grew). A few small reads, whatever the size; `data.verify` checks every line.
    `opened`: (file-like with seek/read, size) instead of opening `tar_path` (a tar in a
    bucket: `data.bucket.RangeFile`)."""
    ends = _first_and_last_rows(idx_path)
    if ends is None:
        return None
    size = opened[1] if opened else os.path.getsize(tar_path)
    with (contextlib.nullcontext(opened[0]) if opened else open(tar_path, "rb")) as t:
        for row in ends:
            for i in range(0, len(row) - 3, 4):
                off, n, name = int(row[i + 1]), int(row[i + 2]), row[i + 3]
                if off + n > size:
                    return (f"truncated tar ({size} bytes) or stale index {idx_path} (member {name} at {off}+{n} "
                            f"lies past the end)")
                if off < BLOCK:
                    return f"stale index {idx_path}: member {name} at offset {off} cannot follow a tar header"
                t.seek(off - BLOCK)
                have = _header_name(t.read(BLOCK))
                if have != name and not (len(name) > 99 and name.startswith(have)) and have != _unfield(name):
                    return f"stale index {idx_path}: it says {name} starts at {off}, the tar has {have!r} there"
        last = ends[1]
        after = max(int(last[i + 1]) + int(last[i + 2]) for i in range(0, len(last) - 3, 4))
        extra = _members_after(t, (after + BLOCK - 1) // BLOCK * BLOCK, size)
    if extra:
        return f"stale index {idx_path}: the tar holds members after the last one it lists ({extra})"
    return None


def _unfield(s: str) -> str:
    if "%" not in s:
        return s
    import urllib.parse

    return urllib.parse.unquote(s)


def _members_after(t, pos: int, size: int, limit: int = 64) -> str | None:
    """The first sample member between `pos` and the end-of-archive marker, if any (GNU tar
    pads archives to 10 KiB records, so a few zero blocks usually follow)."""
    for _ in range(limit):
        if pos + BLOCK > size:
            return None
        t.seek(pos)
        h = t.read(BLOCK)
        if h == ZERO or h[257:262] != b"ustar":
            return None
        n = _octal(h[124:136])
        if h[156] in _REGULAR:
            key, _ = split_name(_header_name(h))
            if key and not key.endswith("/"):
                return _header_name(h)
        pos += BLOCK + (n + BLOCK - 1) // BLOCK * BLOCK
    return None
