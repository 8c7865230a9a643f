#!/usr/bin/env bash
# Build (once) and install horovod 0.28.1 into the active Python environment.
#
#   PYTHON=.venv/bin/python install/horovod.sh
#   HVDTRAIN_SETUP_DRY_RUN=1 HVDTRAIN_HOROVOD_GPU=nccl install/horovod.sh   # flags only
#
# Why this script exists: horovod 0.28.1 (the newest release) asks CMake for C++14
# (`set(CMAKE_CXX_STANDARD 14)` in CMakeLists.txt and horovod/torch/CMakeLists.txt),
# but torch >= 2.1 headers need C++17, so `pip install horovod` fails to compile.
# This script downloads the sdist (or takes a local one), changes both lines to 17 and
# builds with --no-build-isolation against the torch already installed. With NCCL the CUDA kernels' CMAKE_CUDA_STANDARD
# 11 becomes 17 as well (CUDA 13's headers need C++17). The build takes about 5 minutes
# on 2 cores, so the wheel is cached outside the repo, keyed by Python, torch, CUDA and
# build flags.
#
# Environment knobs:
#   PYTHON                  interpreter of the target environment (default: python3)
#   HVDTRAIN_HOROVOD_GPU    auto (default: NCCL when torch has CUDA) | nccl | none (Gloo
#                           only: CUDA tensors are then reduced through host memory)
#   HVDTRAIN_HOROVOD_SDIST  a local horovod-0.28.1.tar.gz (no download); default: the one
#                           in HVDTRAIN_WHEELS if that folder holds it
#   HVDTRAIN_WHEELS         a folder of wheels for offline installs (install/offline_install.sh)
#   HVDTRAIN_SETUP_DRY_RUN  1 = print the build flags and what is missing; build nothing
#   HVDTRAIN_CACHE          cache root (default: ~/.cache/hvdtrain)
#   HVDTRAIN_HOROVOD_FORCE  1 = rebuild even if a cached wheel exists
#   HVDTRAIN_HOROVOD_BUILD_ONLY  1 = build and cache the wheel, install nothing (a build
#                           started early in the background: install/offline_install.sh --horovod)
#   HOROVOD_BUILD_CUDA_CC_LIST  GPU architectures to compile for (default: the visible GPUs')
#   HVDTRAIN_CUDA_DEFAULT   the CUDA toolkit looked at last (default /usr/local/cuda)
set -euo pipefail

PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE_ROOT=${HVDTRAIN_CACHE:-$HOME/.cache/hvdtrain}
DRY=${HVDTRAIN_SETUP_DRY_RUN:-0}
GPU_OPS=${HVDTRAIN_HOROVOD_GPU:-auto}
SDIST=${HVDTRAIN_HOROVOD_SDIST:-}
if [[ -z "$SDIST" && -n "${HVDTRAIN_WHEELS:-}" && -f "$HVDTRAIN_WHEELS/horovod-$HOROVOD_VERSION.tar.gz" ]]; then
    SDIST=$HVDTRAIN_WHEELS/horovod-$HOROVOD_VERSION.tar.gz
fi

die() { echo "install_horovod: ERROR: $*" >&2; exit 1; }
say() { if [[ "$DRY" == 1 ]]; then echo "install_horovod (dry run): $*"; else echo "install_horovod: $*"; fi; }

# Python version, torch version, torch's CUDA (or cpu), NCCL folder of torch's pip deps,
# and the visible GPUs' compute capabilities (e.g. 90) for HOROVOD_BUILD_CUDA_CC_LIST
TORCH_INFO=$("$PYTHON" - <<'PY' 2>/dev/null
import os, sys
import torch
# NCCL of torch's pip dependencies, looked up by path on sys.path: an import (nvidia.nccl)
# can miss it where a venv's own nvidia/__init__.py shadows the image's nvidia/ folder
nccl_dir = next((d for d in (os.path.join(p or ".", "nvidia", "nccl") for p in sys.path)
                 if os.path.isfile(os.path.join(d, "include", "nccl.h"))), "-")
ccs = sorted({"%d%d" % torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())}) \
    if torch.cuda.is_available() else []
print(f"{sys.version_info.major}.{sys.version_info.minor}", torch.__version__, torch.version.cuda or "cpu",
      nccl_dir, ",".join(ccs) or "-")
PY
) || TORCH_INFO=""
if [[ -z "$TORCH_INFO" ]]; then
    [[ "$DRY" == 1 ]] || die "cannot import torch with $PYTHON; install torch first (install/setup.sh does)"
    TORCH_INFO="? (torch-not-installed-yet) cpu - -"
fi
read -r PYVER TORCHVER CUDAVER NCCL_DIR CCS <<<"$TORCH_INFO"

if [[ "$GPU_OPS" == auto ]]; then
    if [[ "$CUDAVER" != cpu ]]; then GPU_OPS=nccl; else GPU_OPS=none; fi
fi
[[ "$GPU_OPS" == nccl || "$GPU_OPS" == none ]] || die "HVDTRAIN_HOROVOD_GPU must be auto, nccl or none, not '$GPU_OPS'"

# Build flags: Gloo always (horovodrun on one machine, elastic mode); NCCL for GPU tensors.
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO
MISSING=()
if [[ "$GPU_OPS" == nccl ]]; then
    export HOROVOD_GPU_OPERATIONS=NCCL HOROVOD_NCCL_LINK=SHARED
    # a CUDA home with nvcc and the headers: HOROVOD_CUDA_HOME, CUDA_HOME, CUDA_PATH, the
    # one around the nvcc on PATH, /usr/local/cuda (an nvcc on PATH may be a wrapper script)
    NVCC=$(command -v nvcc || true)
    CUDA_DIR=""
    for c in "${HOROVOD_CUDA_HOME:-}" "${CUDA_HOME:-}" "${CUDA_PATH:-}" \
             "$(dirname "$(dirname "$(readlink -f "${NVCC:-/nonexistent}")")")" "${HVDTRAIN_CUDA_DEFAULT:-/usr/local/cuda}"; do
        if [[ -z "$CUDA_DIR" && -n "$c" && -x "$c/bin/nvcc" && -f "$c/include/cuda_runtime.h" ]]; then CUDA_DIR=$c; fi
        if [[ -z "$NVCC" && -n "$c" && -x "$c/bin/nvcc" ]]; then NVCC=$c/bin/nvcc; fi
    done
    if [[ -n "$CUDA_DIR" ]]; then
        export HOROVOD_CUDA_HOME=$CUDA_DIR
    elif [[ -z "$NVCC" ]]; then
        MISSING+=("nvcc (the CUDA compiler: not on PATH, nor in \$CUDA_HOME/bin or /usr/local/cuda/bin)")
    else
        MISSING+=("CUDA headers (no include/cuda_runtime.h beside $NVCC, in \$CUDA_HOME or /usr/local/cuda)")
    fi
    # NCCL as torch's pip dependencies bring it (nvidia-nccl-cu12 / -cu13: nvidia/nccl/{include,lib})
    if [[ "$NCCL_DIR" == - || ! -f "$NCCL_DIR/include/nccl.h" || ! -e "$NCCL_DIR/lib/libnccl.so.2" ]]; then
        MISSING+=("NCCL (nccl.h and libnccl.so.2 from torch's nvidia-nccl-cu12/-cu13 package; found: ${NCCL_DIR/#-/none})")
    else
        export HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include"
        # the pip package ships libnccl.so.2 only and CMake looks for libnccl.so: a link in the cache
        LINK_DIR=$CACHE_ROOT/nccl-link/$(printf '%s' "$NCCL_DIR" | sha256sum | cut -c1-12)
        export HOROVOD_NCCL_LIB=$LINK_DIR
    fi
    [[ -n "${HOROVOD_BUILD_CUDA_CC_LIST:-}" || "$CCS" == - ]] || export HOROVOD_BUILD_CUDA_CC_LIST=$CCS
fi
FLAGS=$(env | grep -E '^HOROVOD_' | sort | tr '\n' ' ')
say "horovod $HOROVOD_VERSION for python $PYVER, torch $TORCHVER (CUDA $CUDAVER), GPU operations: $GPU_OPS"
say "build flags: $FLAGS"
say "sdist: ${SDIST:-download horovod==$HOROVOD_VERSION from the package index}"
if ((${#MISSING[@]})); then
    MSG="cannot build horovod with NCCL: missing $(printf '%s; ' "${MISSING[@]}")install the CUDA toolkit \
that matches the driver (nvcc and headers) and torch's CUDA build with its NCCL, or build without GPU \
operations with HVDTRAIN_HOROVOD_GPU=none (Gloo; CUDA tensors are then reduced through host memory)"
    [[ "$DRY" == 1 ]] && { say "would stop here: $MSG"; exit 0; }
    die "$MSG"
fi
[[ "$DRY" == 1 ]] && exit 0

if [[ -n "${LINK_DIR:-}" ]]; then
    mkdir -p "$LINK_DIR" && ln -sf "$NCCL_DIR/lib/libnccl.so.2" "$LINK_DIR/libnccl.so"
fi
FLAGS_HASH=$(printf '%s' "$FLAGS" | sha256sum | cut -c1-12)
KEY="horovod-${HOROVOD_VERSION}-py${PYVER}-torch${TORCHVER}-${CUDAVER}-${FLAGS_HASH}"
WHEEL_DIR="$CACHE_ROOT/wheels/$KEY"
mkdir -p "$CACHE_ROOT/wheels" "$CACHE_ROOT/logs"

# one build at a time per cache: a second caller (set-up while a background build runs)
# waits for the first, then finds its wheel
# (util-linux's flock; without it, no lock)
exec 9>"$CACHE_ROOT/wheels/.build.lock"
LOCKING=0; command -v flock >/dev/null && LOCKING=1
if ((LOCKING)) && ! flock -n 9; then
    echo "install_horovod: another horovod build holds $CACHE_ROOT/wheels/.build.lock; waiting for it (at most 30 min)"
    flock -w 1800 9 || die "the other horovod build did not finish in 30 minutes (lock $CACHE_ROOT/wheels/.build.lock)"
fi
if [[ "${HVDTRAIN_HOROVOD_FORCE:-0}" != 1 ]] && compgen -G "$WHEEL_DIR/horovod-*.whl" >/dev/null; then
    echo "install_horovod: reusing cached wheel $WHEEL_DIR"
else
    LOG="$CACHE_ROOT/logs/$KEY.log"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    echo "install_horovod: building horovod $HOROVOD_VERSION ($KEY), about 5 minutes on 2 cores"
    echo "install_horovod: build log: $LOG"
    (  # a subshell: an `exit` below ends the build, and die says so with the log
        echo "flags: $FLAGS"
        if [[ -n "$SDIST" ]]; then
            cp "$SDIST" "$WORK/"
        else
            "$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
        fi
        tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK" || { echo "cannot unpack the sdist ${SDIST:-downloaded}"; exit 3; }
        SRC="$WORK/horovod-$HOROVOD_VERSION"
        for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
            grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { echo "expected C++14 line not found in $f"; exit 3; }
            sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
        done
        if [[ "$GPU_OPS" == nccl ]]; then
            f="$SRC/horovod/common/ops/cuda/CMakeLists.txt"
            grep -q 'set(CMAKE_CUDA_STANDARD 11)' "$f" || { echo "expected CUDA C++11 line not found in $f"; exit 3; }
            sed -i 's/set(CMAKE_CUDA_STANDARD 11)/set(CMAKE_CUDA_STANDARD 17)/' "$f"
        fi
        MAKEFLAGS="-j$(nproc)" "$PYTHON" -m pip wheel --no-deps --no-build-isolation -w "$WORK/dist" "$SRC"
    ) >"$LOG" 2>&1 || die "horovod build failed; see the build log: $LOG (last lines below)
$(tail -n 25 "$LOG")"
    mkdir -p "$WHEEL_DIR"
    cp "$WORK"/dist/horovod-*.whl "$WHEEL_DIR/"
    echo "install_horovod: cached $(ls "$WHEEL_DIR")"
fi

exec 9>&-  # the lock goes with the descriptor
if [[ "${HVDTRAIN_HOROVOD_BUILD_ONLY:-0}" == 1 ]]; then
    echo "install_horovod: built only (HVDTRAIN_HOROVOD_BUILD_ONLY=1): $(ls "$WHEEL_DIR")"
    exit 0
fi
"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl \
    || die "installing the cached wheel from $WHEEL_DIR failed (delete it to rebuild)"
echo "install_horovod: installed $(ls "$WHEEL_DIR")"
