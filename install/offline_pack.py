"""Slim the wheels of an offline bundle (install/offline_bundle.sh) to what one CPython
loads: a smaller bundle to copy to a node without internet access.

    python install/offline_pack.py SRC DST --python 3.12

Every `*.whl` in SRC is written to DST without what one CPython on Linux never loads, and
stored rather than deflated, so that the bundle's xz sees the raw bytes (DALI's 199 MB
wheel holds 492 MB; xz -9 of the stored copy is a third smaller than the deflated one):

- extension modules built for other CPython versions (`*.cpython-313-x86_64-linux-gnu.so`
  and the like: DALI and nvImageCodec ship one per version, 3.9 to 3.15t);
- nvCOMP's command-line tools (`nvidia/libnvcomp/bin/`).

RECORD loses the dropped files' lines, so pip installs and uninstalls the slimmed wheel as
it would the original. Other files (the horovod sdist) are copied as they are.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import sys
import zipfile

EXT = re.compile(r"\.cpython-(\d+t?)-[^/]*\.so$")
DROP_DIRS = ("nvidia/libnvcomp/bin/",)


def dropped(name: str, abi: str) -> bool:
    """Does a one-CPython (`abi`, e.g. '312') install never load this wheel member?"""
    m = EXT.search(name)
    return bool(m and m.group(1) != abi) or name.startswith(DROP_DIRS)


def slim_wheel(src: str, dst: str, abi: str) -> tuple[int, int]:
    """Write `src`'s members but the dropped ones to `dst`, stored. -> (dropped, kept)."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zout:
        names = zin.namelist()
        drop = {n for n in names if dropped(n, abi)}
        for n in names:
            if n in drop:
                continue
            data = zin.read(n)
            if n.endswith(".dist-info/RECORD"):
                data = "".join(line for line in data.decode().splitlines(True)
                               if line.split(",", 1)[0] not in drop).encode()
            info = zin.getinfo(n)
            info.compress_type = zipfile.ZIP_STORED
            zout.writestr(info, data)
    return len(drop), len(names) - len(drop)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python install/offline_pack.py", description=__doc__.split("\n\n")[0])
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--python", default="3.12", help="the one CPython version the bundle is for")
    a = p.parse_args(argv)
    abi = a.python.replace(".", "")
    os.makedirs(a.dst, exist_ok=True)
    before = after = 0
    for name in sorted(os.listdir(a.src)):
        src, dst = os.path.join(a.src, name), os.path.join(a.dst, name)
        if not name.endswith(".whl"):
            shutil.copyfile(src, dst)
            continue
        try:
            n_drop, _ = slim_wheel(src, dst, abi)
        except (zipfile.BadZipFile, OSError) as e:
            print(f"gpu_pack: ERROR: {src}: {e}", file=sys.stderr)
            return 1
        before, after = before + os.path.getsize(src), after + os.path.getsize(dst)
        if n_drop:
            print(f"gpu_pack: {name}: {n_drop} file(s) dropped")
    print(f"gpu_pack: wheels for CPython {a.python}: {before / 1e6:.1f} MB deflated -> {after / 1e6:.1f} MB stored")
    return 0


if __name__ == "__main__":
    sys.exit(main())
