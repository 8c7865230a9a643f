#!/usr/bin/env bash
# Build (once) and install horovod 0.28.1 into the active Python environment.
#
#   PYTHON=.venv/bin/python launch/install_horovod.sh
#
# Why this script exists: horovod 0.28.1 (the newest release) asks CMake for C++14
# (`set(CMAKE_CXX_STANDARD 14)` in CMakeLists.txt and horovod/torch/CMakeLists.txt),
# but torch >= 2.1 headers need C++17, so `pip install horovod` fails to compile.
# We download the sdist, change both lines to 17 and build with --no-build-isolation
# against the torch already installed. The build takes about 5 minutes on 2 cores, so
# the wheel is cached outside the repo, keyed by Python, torch, CUDA and build flags.
#
# Environment knobs:
#   PYTHON                  interpreter of the target environment (default: python3)
#   HVDTRAIN_CACHE          cache root (default: ~/.cache/hvdtrain)
#   HVDTRAIN_HOROVOD_FORCE  1 = rebuild even if a cached wheel exists
set -euo pipefail

PYTHON=${PYTHON:-python3}
HOROVOD_VERSION=${HOROVOD_VERSION:-0.28.1}
CACHE_ROOT=${HVDTRAIN_CACHE:-$HOME/.cache/hvdtrain}

die() { echo "install_horovod: ERROR: $*" >&2; exit 1; }

read -r PYVER TORCHVER CUDAVER < <("$PYTHON" - <<'PY'
import sys, torch
cuda = torch.version.cuda if torch.cuda.is_available() or torch.version.cuda else None
print(f"{sys.version_info.major}.{sys.version_info.minor}", torch.__version__, cuda or "cpu")
PY
) || die "cannot import torch with $PYTHON; install torch first (launch/setup.sh does)"

# Build flags: Gloo always (horovodrun on one machine, elastic mode); NCCL where torch has CUDA.
export HOROVOD_WITH_PYTORCH=1 HOROVOD_WITHOUT_TENSORFLOW=1 HOROVOD_WITHOUT_MXNET=1
export HOROVOD_WITH_GLOO=1 HOROVOD_WITHOUT_MPI=1 HOROVOD_CPU_OPERATIONS=GLOO
if [[ "$CUDAVER" != "cpu" ]]; then
    export HOROVOD_GPU_OPERATIONS=NCCL
    # NCCL as torch's pip dependencies bring it (nvidia-nccl-cu12 / -cu13).
    NCCL_DIR=$("$PYTHON" - <<'PY'
import importlib.util, os
for name in ("nvidia.nccl",):
    spec = importlib.util.find_spec(name)
    if spec and spec.submodule_search_locations:
        print(list(spec.submodule_search_locations)[0]); break
PY
)
    if [[ -n "$NCCL_DIR" ]]; then
        export HOROVOD_NCCL_INCLUDE="$NCCL_DIR/include" HOROVOD_NCCL_LIB="$NCCL_DIR/lib" HOROVOD_NCCL_LINK=SHARED
        # the pip package ships libnccl.so.2 only; the linker wants libnccl.so
        [[ -e "$NCCL_DIR/lib/libnccl.so" ]] || ln -sf libnccl.so.2 "$NCCL_DIR/lib/libnccl.so" 2>/dev/null || true
    fi
fi
FLAGS=$(env | grep -E '^HOROVOD_' | sort | tr '\n' ' ')
FLAGS_HASH=$(printf '%s' "$FLAGS" | sha256sum | cut -c1-12)
KEY="horovod-${HOROVOD_VERSION}-py${PYVER}-torch${TORCHVER}-${CUDAVER}-${FLAGS_HASH}"
WHEEL_DIR="$CACHE_ROOT/wheels/$KEY"
mkdir -p "$CACHE_ROOT/wheels" "$CACHE_ROOT/logs"

if [[ "${HVDTRAIN_HOROVOD_FORCE:-0}" != 1 ]] && compgen -G "$WHEEL_DIR/horovod-*.whl" >/dev/null; then
    echo "install_horovod: reusing cached wheel $WHEEL_DIR"
else
    LOG="$CACHE_ROOT/logs/$KEY.log"
    WORK=$(mktemp -d)
    trap 'rm -rf "$WORK"' EXIT
    echo "install_horovod: building horovod $HOROVOD_VERSION ($KEY), about 5 minutes on 2 cores"
    echo "install_horovod: build log: $LOG"
    {
        echo "flags: $FLAGS"
        "$PYTHON" -m pip download --no-deps --no-binary :all: "horovod==$HOROVOD_VERSION" -d "$WORK"
        tar -xzf "$WORK"/horovod-"$HOROVOD_VERSION".tar.gz -C "$WORK"
        SRC="$WORK/horovod-$HOROVOD_VERSION"
        for f in "$SRC/CMakeLists.txt" "$SRC/horovod/torch/CMakeLists.txt"; do
            grep -q 'set(CMAKE_CXX_STANDARD 14)' "$f" || { echo "expected C++14 line not found in $f"; exit 3; }
            sed -i 's/set(CMAKE_CXX_STANDARD 14)/set(CMAKE_CXX_STANDARD 17)/' "$f"
        done
        MAKEFLAGS="-j$(nproc)" "$PYTHON" -m pip wheel --no-deps --no-build-isolation -w "$WORK/dist" "$SRC"
    } >"$LOG" 2>&1 || die "horovod build failed; see the build log: $LOG (last lines below)
$(tail -n 25 "$LOG")"
    mkdir -p "$WHEEL_DIR"
    cp "$WORK"/dist/horovod-*.whl "$WHEEL_DIR/"
    echo "install_horovod: cached $(ls "$WHEEL_DIR")"
fi

"$PYTHON" -m pip install -q --no-deps --force-reinstall "$WHEEL_DIR"/horovod-*.whl \
    || die "installing the cached wheel from $WHEEL_DIR failed (delete it to rebuild)"
echo "install_horovod: installed $(ls "$WHEEL_DIR")"
