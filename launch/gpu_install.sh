#!/usr/bin/env bash
# On a GPU machine with no package registry: join the parts launch/gpu_bundle.sh made,
# check them, and set up .venv from them with no hand steps.
#
#   launch/gpu_install.sh && make gpu-check
#   HVDTRAIN_SETUP_DRY_RUN=1 launch/gpu_install.sh     # join and check; print what set-up would do
#
# Set-up runs as `HVDTRAIN_TORCH=system HVDTRAIN_WHEELS=<bundle>/wheels launch/setup.sh`:
# .venv sees the image's Python packages (its torch, NCCL, numpy stay as they are), the
# bundle's wheels of packages the image lacks are installed into .venv with
# `pip install --no-index --no-deps`, and horovod is built from the bundled sdist with the
# C++17 patch and HOROVOD_GPU_OPERATIONS=NCCL against the image's nvidia-nccl-cu13
# (launch/install_horovod.sh). The image's python3 bootstraps (PYTHON_BOOTSTRAP to change).
set -euo pipefail
cd "$(dirname "$0")/.."

B=${HVDTRAIN_BUNDLE_DIR:-.gpu-bundle}
die() { echo "gpu_install: ERROR: $*" >&2; exit 1; }

first=$(ls "$B"/p*/bundle.manifest 2>/dev/null | head -n 1) \
    || die "no $B/p*/bundle.manifest here: carry the part folders that launch/gpu_bundle.sh made"
N=$(awk '$1 == "parts" {print $2}' "$first")
SUM=$(awk '$1 == "sha256" {print $2}' "$first")
PARTS=() MISSING=()
for ((k = 0; k < N; k++)); do
    part=$(printf '%s/p%02d/bundle.tar.part-%02d' "$B" "$k" "$k")
    if [[ -f "$part" ]]; then PARTS+=("$part"); else MISSING+=("$(printf 'p%02d' "$k")"); fi
done
((${#MISSING[@]} == 0)) || die "$B lacks part folder(s) ${MISSING[*]} of $N: carry them (one per device call) and run again"
for m in "$B"/p*/bundle.manifest; do
    grep -q "^sha256 $SUM$" "$m" || die "$m belongs to another bundle than $first: run launch/gpu_bundle.sh once and carry all its parts"
done

WHEELS=$(cd "$B" && pwd)/wheels
if [[ ! -f "$WHEELS/.complete-$SUM" ]]; then
    got=$(cat "${PARTS[@]}" | sha256sum | cut -d' ' -f1)
    [[ "$got" == "$SUM" ]] || die "the joined parts do not match the bundle's sha256 (a part is damaged or truncated): carry them again"
    rm -rf "$WHEELS" && mkdir -p "$WHEELS"
    cat "${PARTS[@]}" | tar -x -C "$WHEELS"
    (cd "$WHEELS" && sha256sum -c --quiet SHA256SUMS) || die "a file of the bundle fails its checksum"
    touch "$WHEELS/.complete-$SUM"
fi
echo "gpu_install: $(ls "$WHEELS" | grep -c -E '\.(whl|tar\.gz)$') files from $N part(s) in $WHEELS, checked"
export HVDTRAIN_TORCH=system HVDTRAIN_WHEELS=$WHEELS PYTHON_BOOTSTRAP=${PYTHON_BOOTSTRAP:-python3}
exec launch/setup.sh
