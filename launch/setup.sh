#!/usr/bin/env bash
# Set up .venv for hvdtrain: torch, horovod (patched build, cached), DALI, the rest.
#
#   make setup            # what `make sanity` and `make test` call first
#
# Versions are pinned in constraints.txt (the one place). A second run with nothing
# changed only checks the environment and prints `horovodrun --check-build`.
#
# Environment knobs:
#   HVDTRAIN_TORCH=system   reuse the torch of the Python that creates the venv
#                           (venv made with --system-site-packages; e.g. a cluster
#                           image with a CUDA torch). Default: pip installs torch
#                           from constraints.txt: the CPU build with no NVIDIA GPU
#                           (this machine's find-links has torch-2.13.0+cpu), the
#                           CUDA build from PyPI where `nvidia-smi` finds a GPU.
#   PYTHON_BOOTSTRAP        interpreter that creates the venv (default python3)
#   HVDTRAIN_CACHE          where the horovod wheel is cached (~/.cache/hvdtrain)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=$VENV/bin/python
BOOT=${PYTHON_BOOTSTRAP:-python3}
TORCH_MODE=${HVDTRAIN_TORCH:-pip}
die() { echo "setup: ERROR: $*" >&2; exit 1; }
# pip, minus the warnings some machines' pip.conf causes for absent local index folders
pipq() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }

STAMP_INPUTS=(constraints.txt setup.py pyproject.toml launch/setup.sh launch/install_horovod.sh)
STAMP_KEY=$( { cat "${STAMP_INPUTS[@]}"; echo "$TORCH_MODE"; "$BOOT" --version; } | sha256sum | cut -c1-16)
STAMP=$VENV/.hvdtrain-setup-$STAMP_KEY

if [[ -f "$STAMP" ]] && "$PY" -c "import torch, horovod.torch, nvidia.dali, webdataset, triton, hvdtrain" 2>/dev/null; then
    echo "setup: .venv is up to date ($STAMP_KEY)"
else
    if [[ ! -x "$PY" ]]; then
        if [[ "$TORCH_MODE" == system ]]; then
            "$BOOT" -c "import torch" 2>/dev/null || die "HVDTRAIN_TORCH=system but $BOOT cannot import torch"
            "$BOOT" -m venv --system-site-packages "$VENV"
        else
            "$BOOT" -m venv "$VENV"
        fi
    fi
    rm -f "$VENV"/.hvdtrain-setup-*
    CONSTRAINTS=$VENV/constraints.txt
    if [[ "$TORCH_MODE" == system ]]; then
        # keep the torch we were given, and the triton that matches it
        grep -v -E '^(torch|triton)==' constraints.txt >"$CONSTRAINTS"
    else
        cp constraints.txt "$CONSTRAINTS"
        TORCH_PIN=$(grep '^torch==' constraints.txt)
        if command -v nvidia-smi >/dev/null && nvidia-smi -L >/dev/null 2>&1; then
            echo "setup: NVIDIA GPU found: installing the CUDA build of $TORCH_PIN from PyPI"
        else
            echo "setup: no NVIDIA GPU: installing the CPU build of $TORCH_PIN"
        fi
        # Never let pip resolve an unpinned torch: on a CPU machine that downloads GBs of CUDA.
        pipq install -q "$TORCH_PIN" || die "pip could not install $TORCH_PIN"
    fi
    pipq install -q -c "$CONSTRAINTS" setuptools wheel packaging cloudpickle psutil pyyaml \
        || die "pip could not install build tools"
    pipq install -q -c "$CONSTRAINTS" nvidia-dali-cuda120 webdataset numpy pillow nvidia-ml-py \
        pytest pytest-timeout tqdm matplotlib tensorboard || die "pip could not install the dependencies"
    # Triton kernels (kernels/): the GPU path, and the CPU tests through TRITON_INTERPRET=1
    if [[ "$TORCH_MODE" != system ]] || ! "$PY" -c "import triton" 2>/dev/null; then
        pipq install -q -c constraints.txt triton || die "pip could not install triton"
    fi
    PYTHON=$PY launch/install_horovod.sh
    pipq install -q --no-deps --no-build-isolation -e . || die "pip install -e . failed"
    "$PY" -c "import torch, horovod.torch, nvidia.dali, webdataset, hvdtrain" \
        || die "the environment does not import; see the messages above"
    touch "$STAMP"
fi
"$PY" -c "import torch, nvidia.dali as d, horovod; print(f'setup: torch {torch.__version__}, DALI {d.__version__}, horovod {horovod.__version__}, CUDA {torch.version.cuda or \"none\"}')"
"$VENV/bin/horovodrun" --check-build
