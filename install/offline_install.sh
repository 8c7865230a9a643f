#!/usr/bin/env bash
# On a GPU machine with no package registry: set up .venv from the parts that
# install/offline_bundle.sh made, with no hand steps.
#
#   install/offline_install.sh --horovod   # with p00 there: start the horovod build in the background
#   install/offline_install.sh             # with every part there: join, check, set up .venv
#   install/offline_install.sh && make gpu-check
#   HVDTRAIN_SETUP_DRY_RUN=1 install/offline_install.sh     # join and check; print what set-up would do
#
# --horovod needs only p00, which holds the horovod sdist: it checks the sdist's sha256 and
# builds it (install/horovod.sh, HVDTRAIN_HOROVOD_BUILD_ONLY=1) in a new session, so
# the build (minutes, with CUDA) runs while the other parts are carried. Set-up later waits
# for it on the build lock and installs the cached wheel.
#
# Without --horovod: the parts are joined, checked against the manifest's sha256, unpacked
# (xz) and every wheel checked; then set-up runs as `HVDTRAIN_TORCH=system
# HVDTRAIN_WHEELS=<bundle>/wheels install/setup.sh`: .venv sees the image's Python packages
# (its torch, NCCL, numpy stay as they are), the bundle's wheels of packages the image lacks
# are installed into .venv with `pip install --no-index --no-deps`, and horovod is built from
# the bundled sdist (or taken from the cache) with the C++17 patch and
# HOROVOD_GPU_OPERATIONS=NCCL against the image's nvidia-nccl-cu13. The image's python3
# bootstraps (PYTHON_BOOTSTRAP to change).
set -euo pipefail
cd "$(dirname "$0")/.."

B=${HVDTRAIN_BUNDLE_DIR:-.gpu-bundle}
BOOT=${PYTHON_BOOTSTRAP:-python3}
CACHE_ROOT=${HVDTRAIN_CACHE:-$HOME/.cache/hvdtrain}
die() { echo "gpu_install: ERROR: $*" >&2; exit 1; }

[[ -f "$B/p00/bundle.manifest" ]] \
    || die "no $B/p00/bundle.manifest here: carry the part folders that install/offline_bundle.sh made, p00 first"
M=$B/p00/bundle.manifest
N=$(awk '$1 == "parts" {print $2}' "$M")
SUM=$(awk '$1 == "sha256" {print $2}' "$M")
read -r SDIST_NAME SDIST_SUM < <(awk '$1 == "sdist" {print $2, $3}' "$M") || true
[[ -n "$N" && -n "$SUM" && -n "${SDIST_NAME:-}" ]] || die "$M is not a bundle manifest of install/offline_bundle.sh"
SDIST=$(cd "$B/p00" && pwd)/$SDIST_NAME
[[ -f "$SDIST" && "$(sha256sum "$SDIST" | cut -d' ' -f1)" == "$SDIST_SUM" ]] \
    || die "$SDIST is missing or fails its sha256: carry p00 again"

if [[ "${1:-}" == --horovod ]]; then
    mkdir -p "$CACHE_ROOT/logs"
    LOG=$CACHE_ROOT/logs/horovod-background.log
    # a new session: the device tool ends a call's processes when it returns, but not these
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
((${#MISSING[@]} == 0)) || die "$B lacks part folder(s) ${MISSING[*]} of $N: carry them (one per device call) and run again"
for m in "$B"/p*/bundle.manifest; do
    grep -q "^sha256 $SUM$" "$m" || die "$m belongs to another bundle than $M: run install/offline_bundle.sh once and carry all its parts"
done

decompress() {  # xz -d of stdin: xz where installed, else Python's lzma
    if command -v xz >/dev/null; then xz -d -T0 -c
    else "$BOOT" -c "import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.stdin.buffer), sys.stdout.buffer, 1 << 20)"; fi
}
WHEELS=$(cd "$B" && pwd)/wheels
if [[ ! -f "$WHEELS/.complete-$SUM" ]]; then
    got=$(cat "${PARTS[@]}" | sha256sum | cut -d' ' -f1)
    [[ "$got" == "$SUM" ]] || die "the joined parts do not match the bundle's sha256 (a part is damaged or truncated): carry them again"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    cat "${PARTS[@]}" | decompress | tar -x -C "$WHEELS" || die "unpacking the joined parts failed"
    (cd "$WHEELS" && sha256sum -c --quiet SHA256SUMS) || die "a file of the bundle fails its checksum"
    cp "$SDIST" "$WHEELS/"
    touch "$WHEELS/.complete-$SUM"
fi
echo "gpu_install: $(ls "$WHEELS" | grep -c -E '\.(whl|tar\.gz)$') files from $N part(s) in $WHEELS, checked"
export HVDTRAIN_TORCH=system HVDTRAIN_WHEELS=$WHEELS PYTHON_BOOTSTRAP=$BOOT HVDTRAIN_CACHE=$CACHE_ROOT
exec install/setup.sh
