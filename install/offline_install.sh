#!/usr/bin/env bash
# On a GPU node without internet access: set up .venv from the bundle that
# install/offline_bundle.sh made (docs/gpu-check.md), with no hand steps.
#
#   install/offline_install.sh             # every part folder in .gpu-bundle/: join, check, set up .venv
#   install/offline_install.sh && make gpu-check ARGS="--out runs/node-check"
#   install/offline_install.sh --horovod   # optional, with p00 there: start the horovod build early
#   HVDTRAIN_SETUP_DRY_RUN=1 install/offline_install.sh     # join and check; print what set-up would do
#
# install/offline_check.sh runs this, then the check, in one command.
#
# --horovod needs only p00, which holds the horovod sdist: it checks the sdist's sha256 and
# builds it (install/horovod.sh, HVDTRAIN_HOROVOD_BUILD_ONLY=1) in a session of its own, so
# the build (minutes, with CUDA) runs while the other parts are still being copied, and
# goes on after the shell that started it ends. Set-up later waits for it on the build lock
# and installs the cached wheel.
#
# Without --horovod: the parts are joined, checked against the manifest's sha256, unpacked
# (xz) and every wheel checked; then set-up runs as `HVDTRAIN_TORCH=system
# HVDTRAIN_WHEELS=<bundle>/wheels install/setup.sh`: .venv sees the image's Python packages
# (its torch, NCCL, numpy stay as they are), the bundle's wheels of packages the image lacks
# are installed into .venv with `pip install --no-index --no-deps`, and horovod is built from
# the bundled sdist (or taken from the cache) with the C++17 patch and
# HOROVOD_GPU_OPERATIONS=NCCL against the image's nvidia-nccl package. The image's python3
# bootstraps (PYTHON_BOOTSTRAP to change); HVDTRAIN_BUNDLE_DIR is the bundle (default
# .gpu-bundle), HVDTRAIN_CACHE the horovod wheel cache (default ~/.cache/hvdtrain).
set -euo pipefail
cd "$(dirname "$0")/.."

B=${HVDTRAIN_BUNDLE_DIR:-.gpu-bundle}
BOOT=${PYTHON_BOOTSTRAP:-python3}
CACHE_ROOT=${HVDTRAIN_CACHE:-$HOME/.cache/hvdtrain}
die() { echo "gpu_install: ERROR: $*" >&2; exit 1; }
# a bundle that does not suit this node: stop (a dry run says so and goes on)
unsuited() {
    if [[ "${HVDTRAIN_SETUP_DRY_RUN:-0}" == 1 ]]; then echo "gpu_install (dry run): would stop here: $*"; else die "$*"; fi
}

[[ -f "$B/p00/bundle.manifest" ]] \
    || die "no $B/p00/bundle.manifest here: copy the part folders that install/offline_bundle.sh made into $B/, p00 first"
M=$B/p00/bundle.manifest
N=$(awk '$1 == "parts" {print $2}' "$M")
SUM=$(awk '$1 == "sha256" {print $2}' "$M")
read -r SDIST_NAME SDIST_SUM < <(awk '$1 == "sdist" {print $2, $3}' "$M") || true
[[ -n "$N" && -n "$SUM" && -n "${SDIST_NAME:-}" ]] || die "$M is not a bundle manifest of install/offline_bundle.sh"
SDIST=$(cd "$B/p00" && pwd)/$SDIST_NAME
[[ -f "$SDIST" && "$(sha256sum "$SDIST" | cut -d' ' -f1)" == "$SDIST_SUM" ]] \
    || die "$SDIST is missing or fails its sha256: copy p00 again"
# the bundle holds wheels for one CPython and one CUDA major version: DALI built for
# another Python does not load, and set-up picks DALI's build from the driver (install/setup.sh)
WANT_PY=$(awk '$1 == "python" {print $2}' "$M")
WANT_CUDA=$(awk '$1 == "cuda" {print $2}' "$M")
HAVE_PY=$("$BOOT" -c 'import sys; print(f"{sys.version_info.major}.{sys.version_info.minor}")' 2>/dev/null) \
    || die "cannot run $BOOT (PYTHON_BOOTSTRAP): the Python that .venv is made from"
[[ -z "$WANT_PY" || "$WANT_PY" == "$HAVE_PY" ]] \
    || unsuited "the bundle is for CPython $WANT_PY but $BOOT is $HAVE_PY: build it again with install/offline_bundle.sh --python $HAVE_PY"
HAVE_CUDA=$(nvidia-smi 2>/dev/null | sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' | head -n 1 || true)
if [[ -n "$WANT_CUDA" && -n "$HAVE_CUDA" ]] && ((HAVE_CUDA >= 12)); then  # older: set-up names it
    ((HAVE_CUDA >= 13)) && HAVE_CUDA=13
    [[ "$WANT_CUDA" == "$HAVE_CUDA" ]] \
        || unsuited "the bundle is for a CUDA $WANT_CUDA driver but nvidia-smi reports CUDA $HAVE_CUDA: build it again with install/offline_bundle.sh --cuda $HAVE_CUDA"
fi

if [[ "${1:-}" == --horovod ]]; then
    mkdir -p "$CACHE_ROOT/logs"
    LOG=$CACHE_ROOT/logs/horovod-background.log
    # a session of its own: the build goes on when this shell (an ssh login) ends
    HVDTRAIN_HOROVOD_SDIST=$SDIST HVDTRAIN_HOROVOD_BUILD_ONLY=1 PYTHON=$BOOT HVDTRAIN_CACHE=$CACHE_ROOT \
        setsid nohup install/horovod.sh >"$LOG" 2>&1 </dev/null &
    echo "gpu_install: horovod build started in the background (pid $!, log $LOG); set-up waits for it"
    exit 0
fi
[[ $# == 0 ]] || die "unknown argument '$1' (--horovod, or none)"

PARTS=() MISSING=()
for ((k = 0; k < N; k++)); do
    part=$(printf '%s/p%02d/bundle.tar.xz.part-%02d' "$B" "$k" "$k")
    if [[ -f "$part" ]]; then PARTS+=("$part"); else MISSING+=("$(printf 'p%02d' "$k")"); fi
done
((${#MISSING[@]} == 0)) || die "$B lacks part folder(s) ${MISSING[*]} of $N: copy them into $B/ and run again"
for m in "$B"/p*/bundle.manifest; do
    grep -q "^sha256 $SUM$" "$m" || die "$m belongs to another bundle than $M: run install/offline_bundle.sh once and copy all its parts"
done

decompress() {  # xz -d of stdin: xz where installed, else Python's lzma
    if command -v xz >/dev/null; then xz -d -T0 -c
    else "$BOOT" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)"; fi
}
WHEELS=$(cd "$B" && pwd)/wheels
if [[ ! -f "$WHEELS/.complete-$SUM" ]]; then
    got=$(cat "${PARTS[@]}" | sha256sum | cut -d' ' -f1)
    [[ "$got" == "$SUM" ]] || die "the joined parts do not match the bundle's sha256 (a part is damaged or truncated): copy them again"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    cat "${PARTS[@]}" | decompress | tar -x -C "$WHEELS" || die "unpacking the joined parts failed"
    (cd "$WHEELS" && sha256sum -c --quiet SHA256SUMS) || die "a file of the bundle fails its checksum"
    cp "$SDIST" "$WHEELS/"
    touch "$WHEELS/.complete-$SUM"
fi
echo "gpu_install: $(ls "$WHEELS" | grep -c -E '\.(whl|tar\.gz)$') files from $N part(s) in $WHEELS, checked" \
    "(CPython ${WANT_PY:-?}, CUDA ${WANT_CUDA:-?})"
export HVDTRAIN_TORCH=system HVDTRAIN_WHEELS=$WHEELS PYTHON_BOOTSTRAP=$BOOT HVDTRAIN_CACHE=$CACHE_ROOT
exec install/setup.sh
