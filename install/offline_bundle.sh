#!/usr/bin/env bash
# Pack what a GPU machine with no package registry lacks, in parts small enough to carry.
#
#   install/offline_bundle.sh        # here, where PyPI answers: .gpu-bundle/p00 .. pNN (git-ignored)
#   ...carry one part folder per device call (a call carries 64 MiB at most, tree included)...
#   install/offline_install.sh --horovod   # there, with p00: the horovod build (NCCL) starts in the background
#   install/offline_install.sh       # there, with the last part: join, check, install into .venv
#
# The GPU image (docs/gpu-runs.md) has Python 3.12, torch 2.11 + CUDA 13 with its
# nvidia-nccl-cu13, nvcc, CMake, numpy, pytest, matplotlib, nvidia-ml-py; it lacks DALI's
# CUDA 13 build and its dependencies, webdataset and horovod. The wheels are for CPython
# 3.12 on manylinux_2_28 x86_64, downloaded with --no-deps at the versions DALI asks for
# (its METADATA: nvimgcodec-cu13[all] >=0.9,<0.10, libnvcomp-cu13 ==5.3.0.16, ...).
#
# Environment knobs:
#   HVDTRAIN_BUNDLE_DIR   output folder (default .gpu-bundle)
#   HVDTRAIN_BUNDLE_PY    target Python version (default 3.12)
#   HVDTRAIN_BUNDLE_FROM  pack this folder's files instead of downloading (tests; extra wheels)
#   HVDTRAIN_BUNDLE_PART  part size for `split -b` (default 58m)
#   HVDTRAIN_BUNDLE_XZ    xz level (default 9)
#   PYTHON                the Python whose pip downloads (default .venv/bin/python)
set -euo pipefail
cd "$(dirname "$0")/.."

OUT=${HVDTRAIN_BUNDLE_DIR:-.gpu-bundle}
PYV=${HVDTRAIN_BUNDLE_PY:-3.12}
PY=${PYTHON:-.venv/bin/python}
PART=${HVDTRAIN_BUNDLE_PART:-58m}   # + the sdist (3.4 MiB, p00) + the working tree < one call's 64 MiB
die() { echo "gpu_bundle: ERROR: $*" >&2; exit 1; }
pin() { grep -E "^$1==" constraints.txt || die "constraints.txt has no pin for $1"; }

WHEELS=(
    "$(pin nvidia-dali-cuda130)"
    "nvidia-nvimgcodec-cu13>=0.9.0,<0.10.0"      # DALI: nvidia-nvimgcodec-cu13[all]
    "nvidia-nvjpeg>=13.0,<13.1"                  # nvimgcodec[all]: nvJPEG of CUDA 13.0, as torch cu130
    "nvidia-nvjpeg2k-cu13"
    "nvidia-nvtiff-cu13>=0.8.0"
    "nvidia-libnvcomp-cu13==5.3.0.16"            # DALI's exact pin
    "astunparse>=1.6.0,<=1.6.3" "gast>=0.3.3,<=0.7.0" optree makefun "libcst~=1.8" nvtx
    "$(pin webdataset)" braceexpand
    "$(pin safetensors)"                          # hvdtrain.export (abi3: any CPython)
)
HOROVOD=$(pin horovod)

DL=$OUT/dl
rm -rf "$OUT" && mkdir -p "$DL"
pipq() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
compress() {  # xz -$1 of stdin, on every core where xz is installed, else Python's lzma
    if command -v xz >/dev/null; then xz -T0 "-$1" -c
    else "$PY" -c $'import lzma, shutil, sys\nwith lzma.open(sys.stdout.buffer, "wb", preset=int(sys.argv[1])) as f:\n    shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)' "$1"; fi
}
download() {
    echo "gpu_bundle: downloading ${#WHEELS[@]} wheels for CPython $PYV manylinux_2_28_x86_64, and the $HOROVOD sdist"
    # every manylinux tag a glibc 2.28 machine runs (pip does not widen a --platform by itself)
    PLATFORMS=(--platform manylinux2014_x86_64)
    for g in $(seq 17 28); do PLATFORMS+=(--platform "manylinux_2_${g}_x86_64"); done
    pipq download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --abi "cp${PYV/./}" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$DL" "${WHEELS[@]}" \
        || die "pip download of the wheels failed"
    pipq download -q --no-deps --no-binary :all: -d "$DL" "$HOROVOD" || die "pip download of $HOROVOD failed"
}
if [[ -n "${HVDTRAIN_BUNDLE_FROM:-}" ]]; then cp -- "$HVDTRAIN_BUNDLE_FROM"/* "$DL/"; else download; fi

# requirements of the bundled wheels that the bundle does not hold: the image must have them
"$PY" - "$DL" "$PYV" <<'PY'
import glob, os, re, sys, zipfile
from packaging.requirements import Requirement
norm = lambda s: re.sub(r"[-_.]+", "-", s).lower()
env = {"python_version": sys.argv[2], "python_full_version": sys.argv[2] + ".0", "sys_platform": "linux",
       "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
wheels = glob.glob(os.path.join(sys.argv[1], "*.whl"))
have = {norm(os.path.basename(w).split("-")[0]) for w in wheels} | {"horovod"}
need = set()
for w in wheels:
    with zipfile.ZipFile(w) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        for line in z.read(meta).decode().splitlines():
            if line.startswith("Requires-Dist:"):
                r = Requirement(line.split(":", 1)[1].strip())
                if r.marker is None or r.marker.evaluate(env):
                    need.add(norm(r.name))
print("gpu_bundle: the image must already have:", ", ".join(sorted(need - have)) or "nothing")
PY

# the wheels, slimmed to one CPython and stored (install/offline_pack.py), in one tar.xz; the
# horovod sdist travels beside part 00, so its build can start in the first device call
PACK=$OUT/pack
"$PY" install/offline_pack.py "$DL" "$PACK" --python "$PYV" || die "slimming the wheels failed"
SDIST_PATH=$(ls "$PACK"/horovod-*.tar.gz 2>/dev/null | head -n 1 || true)
[[ -n "$SDIST_PATH" ]] || die "no horovod sdist among the downloads"
SDIST_NAME=$(basename "$SDIST_PATH")
mkdir -p "$OUT/p00"
mv "$PACK/$SDIST_NAME" "$OUT/p00/"
SDIST_SUM=$(sha256sum "$OUT/p00/$SDIST_NAME" | cut -d' ' -f1)
XZ_LEVEL=${HVDTRAIN_BUNDLE_XZ:-9}
echo "gpu_bundle: xz -$XZ_LEVEL of $(du -sh "$PACK" | cut -f1) of wheels (about 4 minutes on 2 cores)"
(cd "$PACK" && sha256sum -- *.whl >SHA256SUMS && tar -cf - -- *) | compress "$XZ_LEVEL" >"$OUT/bundle.tar.xz" \
    || die "packing the wheels failed"
split -b "$PART" -d -a 2 "$OUT/bundle.tar.xz" "$OUT/bundle.tar.xz.part-"
N=$(ls "$OUT"/bundle.tar.xz.part-* | wc -l)
SUM=$(sha256sum "$OUT/bundle.tar.xz" | cut -d' ' -f1)
for part in "$OUT"/bundle.tar.xz.part-*; do
    k=${part##*-}
    mkdir -p "$OUT/p$k"
    mv "$part" "$OUT/p$k/"
    printf 'parts %s\nsha256 %s\nsdist %s %s\n' "$N" "$SUM" "$SDIST_NAME" "$SDIST_SUM" >"$OUT/p$k/bundle.manifest"
done
rm -rf "$DL" "$PACK" "$OUT/bundle.tar.xz"
echo "gpu_bundle: $(du -sh "$OUT" | cut -f1) in $N part folder(s) (p00 also holds $SDIST_NAME):"
for d in "$OUT"/p*; do
    echo "  $d  $(du -sh "$d" | cut -f1)"
    (($(du -sb "$d" | cut -f1) <= 63 * 1024 * 1024)) \
        || die "$d is over 63 MiB: with the working tree it would not fit one device call; lower HVDTRAIN_BUNDLE_PART"
done
echo "gpu_bundle: carry each folder in its own device call (docs/gpu-runs.md): with p00, start the"
echo "gpu_bundle: horovod build (install/offline_install.sh --horovod); with the last, install/offline_install.sh"
