#!/usr/bin/env bash
# Pack, on a machine with internet access, what a GPU node without it needs to set up
# hvdtrain: DALI's CUDA build and its libraries, webdataset and the horovod sdist, as wheels
# for the node's Python (docs/gpu-check.md).
#
#   install/offline_bundle.sh                        # CPython 3.12, a CUDA 13 driver: .gpu-bundle/p00
#   install/offline_bundle.sh --python 3.11 --cuda 12 --part-mib 1024
#   ...copy .gpu-bundle/ into the checkout on the node, then there:
#   install/offline_check.sh --out runs/node-check   # set up offline, then the GPU node check
#
# Options:
#   --python X.Y     the node's Python version (default 3.12): wheels for that CPython only
#   --cuda 12|13     the CUDA major version the node's driver reports (`nvidia-smi`, "CUDA
#                    Version"; default 13): nvidia-dali-cuda120 or -cuda130 and their libraries
#   --part-mib N     split the packed wheels into parts of N MiB, one folder each (p00, p01,
#                    ...), for a medium with a file size limit (a FAT32 drive: 4095) or
#                    copies done one by one; default 0 = one part, the simplest to copy
#   --add SPEC       one more package for the bundle, e.g. --add tqdm (one the node's Python
#                    lacks: set-up names it); repeatable
#   --from DIR       pack the files in DIR instead of downloading (a download made elsewhere)
#   --xz LEVEL       xz compression level (default 9: about 4 minutes on 2 cores; 1: seconds)
# Environment: HVDTRAIN_BUNDLE_DIR (output folder, default .gpu-bundle; git-ignored),
# PYTHON (the Python whose pip downloads, default .venv/bin/python).
#
# The node's image must have Python with a CUDA build of torch and its nvidia-nccl package,
# the CUDA toolkit (nvcc, headers), CMake and a C++17 compiler (horovod is built there, with
# NCCL, against that torch), and the packages this script names in its line "the image must
# already have: ..." (docs/gpu-check.md lists the rest).
# The wheels are for manylinux_2_28 x86_64 (glibc 2.28 or newer), downloaded with --no-deps
# at the versions DALI asks for (its METADATA: nvimgcodec[all] >=0.9,<0.10, libnvcomp
# ==5.3.0.16, ...); install/offline_pack.py slims them to the one CPython and xz packs them.
set -euo pipefail
cd "$(dirname "$0")/.."

BUNDLE=${HVDTRAIN_BUNDLE_DIR:-.gpu-bundle}
PY=${PYTHON:-.venv/bin/python}
PYV=3.12 CUDA=13 PART_MIB=0 XZ_LEVEL=9 FROM="" ADD=()
die() { echo "gpu_bundle: ERROR: $*" >&2; exit 1; }
while (($#)); do
    case "$1" in
        --python) PYV=${2:?--python needs a version, e.g. 3.12}; shift 2 ;;
        --cuda) CUDA=${2:?--cuda needs 12 or 13}; shift 2 ;;
        --part-mib) PART_MIB=${2:?--part-mib needs a size in MiB}; shift 2 ;;
        --add) ADD+=("${2:?--add needs a package}"); shift 2 ;;
        --from) FROM=${2:?--from needs a folder}; shift 2 ;;
        --xz) XZ_LEVEL=${2:?--xz needs a level, 0-9}; shift 2 ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done
[[ "$PYV" =~ ^3\.[0-9]+$ ]] || die "--python takes a CPython version such as 3.12, not '$PYV'"
[[ "$XZ_LEVEL" =~ ^[0-9]$ ]] || die "--xz takes a level 0-9, not '$XZ_LEVEL'"
# the part size in bytes (a fraction of a MiB is allowed: small parts for tests)
PART_BYTES=$("$PY" -c 'import sys; n = float(sys.argv[1]); assert n >= 0; print(int(n * 2**20))' "$PART_MIB" 2>/dev/null) \
    || die "--part-mib takes a size in MiB (0: one part), not '$PART_MIB'"
pin() { grep -E "^$1==" constraints.txt || die "constraints.txt has no pin for $1"; }

case "$CUDA" in
    13) WHEELS=(
            "$(pin nvidia-dali-cuda130)"
            "nvidia-nvimgcodec-cu13>=0.9.0,<0.10.0"      # DALI: nvidia-nvimgcodec-cu13[all]
            "nvidia-nvjpeg>=13.0,<13.1"                  # nvimgcodec[all]: nvJPEG of CUDA 13.0, as torch cu130
            "nvidia-nvjpeg2k-cu13"
            "nvidia-nvtiff-cu13>=0.8.0"
            "nvidia-libnvcomp-cu13==5.3.0.16"            # DALI's exact pin
        ) ;;
    12) WHEELS=(
            "$(pin nvidia-dali-cuda120)"
            "nvidia-nvimgcodec-cu12>=0.9.0,<0.10.0"      # DALI: nvidia-nvimgcodec-cu12[all]
            "nvidia-nvjpeg-cu12"
            "nvidia-nvjpeg2k-cu12"
            "nvidia-nvtiff-cu12>=0.8.0"
            "nvidia-libnvcomp-cu12==5.3.0.16"            # DALI's exact pin
        ) ;;
    *) die "--cuda takes 12 or 13 (the driver's CUDA major version), not '$CUDA'" ;;
esac
WHEELS+=(
    "astunparse>=1.6.0,<=1.6.3" "gast>=0.3.3,<=0.7.0" optree makefun "libcst~=1.8" nvtx   # DALI's
    "$(pin webdataset)" braceexpand
    "$(pin safetensors)"                          # hvdtrain.export (abi3: any CPython)
    "${ADD[@]}"
)
HOROVOD=$(pin horovod)

DL=$BUNDLE/dl
rm -rf "$BUNDLE" && mkdir -p "$DL"
pipq() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
compress() {  # xz -$1 of stdin, on every core where xz is installed, else Python's lzma
    if command -v xz >/dev/null; then xz -T0 "-$1" -c
    else "$PY" -c $'import lzma, shutil, sys\nwith lzma.open(sys.stdout.buffer, "wb", preset=int(sys.argv[1])) as f:\n    shutil.copyfileobj(sys.stdin.buffer, f, 1 << 20)' "$1"; fi
}
download() {
    echo "gpu_bundle: downloading ${#WHEELS[@]} wheels for CPython $PYV manylinux_2_28_x86_64 (CUDA $CUDA), and the $HOROVOD sdist"
    # every manylinux tag a glibc 2.28 machine runs (pip does not widen a --platform by itself)
    PLATFORMS=(--platform manylinux2014_x86_64)
    for g in $(seq 17 28); do PLATFORMS+=(--platform "manylinux_2_${g}_x86_64"); done
    pipq download -q --no-deps --only-binary=:all: --python-version "$PYV" --implementation cp \
        --abi "cp${PYV/./}" --abi abi3 --abi none "${PLATFORMS[@]}" -d "$DL" "${WHEELS[@]}" \
        || die "pip download of the wheels failed"
    pipq download -q --no-deps --no-binary :all: -d "$DL" "$HOROVOD" || die "pip download of $HOROVOD failed"
}
if [[ -n "$FROM" ]]; then cp -- "$FROM"/* "$DL/"; else download; fi

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
# horovod sdist sits beside part 00, so its build can start while later parts are copied
PACK=$BUNDLE/pack
"$PY" install/offline_pack.py "$DL" "$PACK" --python "$PYV" || die "slimming the wheels failed"
SDIST_PATH=$(ls "$PACK"/horovod-*.tar.gz 2>/dev/null | head -n 1 || true)
[[ -n "$SDIST_PATH" ]] || die "no horovod sdist among the downloads"
SDIST_NAME=$(basename "$SDIST_PATH")
mkdir -p "$BUNDLE/p00"
mv "$PACK/$SDIST_NAME" "$BUNDLE/p00/"
SDIST_SUM=$(sha256sum "$BUNDLE/p00/$SDIST_NAME" | cut -d' ' -f1)
echo "gpu_bundle: xz -$XZ_LEVEL of $(du -sh "$PACK" | cut -f1) of wheels (at -9 about 4 minutes on 2 cores)"
(cd "$PACK" && sha256sum -- *.whl >SHA256SUMS && tar -cf - -- *) | compress "$XZ_LEVEL" >"$BUNDLE/bundle.tar.xz" \
    || die "packing the wheels failed"
if ((PART_BYTES > 0)); then
    split -b "$PART_BYTES" -d -a 2 "$BUNDLE/bundle.tar.xz" "$BUNDLE/bundle.tar.xz.part-"
else
    mv "$BUNDLE/bundle.tar.xz" "$BUNDLE/bundle.tar.xz.part-00"
fi
N=$(ls "$BUNDLE"/bundle.tar.xz.part-* | wc -l)
SUM=$(cat "$BUNDLE"/bundle.tar.xz.part-* | sha256sum | cut -d' ' -f1)
for part in "$BUNDLE"/bundle.tar.xz.part-*; do
    k=${part##*-}
    mkdir -p "$BUNDLE/p$k"
    mv "$part" "$BUNDLE/p$k/"
    printf 'parts %s\nsha256 %s\nsdist %s %s\npython %s\ncuda %s\n' "$N" "$SUM" "$SDIST_NAME" "$SDIST_SUM" "$PYV" "$CUDA" \
        >"$BUNDLE/p$k/bundle.manifest"
done
rm -rf "$DL" "$PACK" "$BUNDLE/bundle.tar.xz"
echo "gpu_bundle: $(du -sh "$BUNDLE" | cut -f1) in $N part folder(s) for CPython $PYV and a CUDA $CUDA driver (p00 also holds $SDIST_NAME):"
for d in "$BUNDLE"/p*; do echo "  $d  $(du -sh "$d" | cut -f1)"; done
echo "gpu_bundle: copy $BUNDLE/ into the root of the checkout on the node, then run there:"
echo "gpu_bundle:   install/offline_check.sh --out runs/node-check      (docs/gpu-check.md)"
