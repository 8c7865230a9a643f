#!/usr/bin/env bash
# Set up .venv for hvdtrain: torch, horovod (patched build, cached), DALI, the rest.
#
#   make setup                                   # what `make sanity` and `make test` call first
#   HVDTRAIN_SETUP_DRY_RUN=1 install/setup.sh     # print the packages and build flags; install nothing
#
# Versions are pinned in constraints.txt (the one place). A second run with nothing
# changed only checks the environment and prints `horovodrun --check-build`.
#
# The GPU decides the builds. `nvidia-smi` prints the driver's "CUDA Version: X.Y":
#   no GPU driver  torch's CPU build, nvidia-dali-cuda120 (its CPU backend), horovod with Gloo
#   CUDA 12        torch's CUDA 12 build (from HVDTRAIN_TORCH_INDEX), nvidia-dali-cuda120,
#                  horovod with Gloo + NCCL
#   CUDA 13 or up  torch from PyPI (its default build there is CUDA 13), nvidia-dali-cuda130,
#                  horovod with Gloo + NCCL (NCCL from torch's nvidia-nccl-cu13 package)
#
# Environment knobs:
#   HVDTRAIN_TORCH=system   reuse the torch of the Python that creates the venv (a cluster
#                           image with a CUDA torch): the venv sees that Python's packages
#                           (even when it is itself a venv) and pip adds only what is
#                           missing, pinned; what the image has is kept. Default: pip, or
#                           system when .venv was made that way.
#   HVDTRAIN_TORCH_INDEX    the index torch comes from. CUDA 12 driver: default
#                           https://download.pytorch.org/whl/cu126 (PyPI's torch is CUDA 13).
#                           No GPU: default none, since this machine's find-links holds
#                           torch-2.13.0+cpu; elsewhere https://download.pytorch.org/whl/cpu
#   HVDTRAIN_WHEELS=DIR     install offline from a folder of wheels and the horovod sdist
#                           (install/offline_install.sh on a machine with no package registry)
#   HVDTRAIN_HOROVOD_GPU    nccl | none: override the horovod GPU operations chosen above
#   HVDTRAIN_EXTRAS         space-separated extras: remote (boto3, google-cloud-storage: s3:// and
#                           gs:// data), test (remote + the moto S3 server and the GCS emulator
#                           the tests run); `make setup EXTRAS=remote`, and `make test` adds both
#   HVDTRAIN_SETUP_DRY_RUN  1 = print the choices, pip commands and horovod flags; install nothing
#   PYTHON_BOOTSTRAP        interpreter that creates the venv (default python3)
#   HVDTRAIN_CACHE          where the horovod wheel is cached (~/.cache/hvdtrain)
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=.venv
PY=$VENV/bin/python
BOOT=${PYTHON_BOOTSTRAP:-python3}
DRY=${HVDTRAIN_SETUP_DRY_RUN:-0}
WHEELS=${HVDTRAIN_WHEELS:-}
die() { echo "setup: ERROR: $*" >&2; exit 1; }
say() { if [[ "$DRY" == 1 ]]; then echo "setup (dry run): $*"; else echo "setup: $*"; fi; }
# pip, minus the warnings some machines' pip.conf causes for absent local index folders
pipq() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
# pip install, or in a dry run the command it would be
pip_install() {
    local offline=()
    [[ -z "$WHEELS" ]] || offline=(--no-index --find-links "$WHEELS")
    if [[ "$DRY" == 1 ]]; then echo "setup (dry run): would run: pip install ${offline[*]:+${offline[*]} }$*"; return 0; fi
    pipq install -q "${offline[@]}" "$@"
}

DEFAULT_MODE=pip
if grep -qs '^include-system-site-packages *= *true' "$VENV/pyvenv.cfg"; then DEFAULT_MODE=system; fi
TORCH_MODE=${HVDTRAIN_TORCH:-$DEFAULT_MODE}
[[ "$TORCH_MODE" == pip || "$TORCH_MODE" == system ]] || die "HVDTRAIN_TORCH must be pip or system, not '$TORCH_MODE'"

# ---- the driver's CUDA major version ("none" without a working nvidia-smi)
driver_cuda_major() {
    local smi v
    command -v nvidia-smi >/dev/null || { echo none; return; }
    smi=$(nvidia-smi 2>/dev/null) || { echo none; return; }
    v=$(sed -n 's/.*CUDA Version: *\([0-9][0-9]*\)\..*/\1/p' <<<"$smi" | head -n 1)
    echo "${v:-none}"
}
CUDA_MAJOR=$(driver_cuda_major)
TORCH_PIN=$(grep '^torch==' constraints.txt)
TORCH_INDEX=()
if [[ "$CUDA_MAJOR" == none ]]; then
    DALI_PKG=nvidia-dali-cuda120 HVD_GPU=none
    [[ -z "${HVDTRAIN_TORCH_INDEX:-}" ]] || TORCH_INDEX=(--index-url "$HVDTRAIN_TORCH_INDEX")
    say "no NVIDIA GPU driver (nvidia-smi): CPU torch, DALI's CPU backend"
elif ((CUDA_MAJOR == 12)); then
    DALI_PKG=nvidia-dali-cuda120 HVD_GPU=nccl
    TORCH_INDEX=(--index-url "${HVDTRAIN_TORCH_INDEX:-https://download.pytorch.org/whl/cu126}")
    say "NVIDIA driver for CUDA 12: torch's CUDA 12 build, $DALI_PKG"
elif ((CUDA_MAJOR >= 13)); then
    DALI_PKG=nvidia-dali-cuda130 HVD_GPU=nccl
    [[ -z "${HVDTRAIN_TORCH_INDEX:-}" ]] || TORCH_INDEX=(--index-url "$HVDTRAIN_TORCH_INDEX")
    say "NVIDIA driver for CUDA $CUDA_MAJOR: torch's CUDA 13 build, $DALI_PKG"
else
    die "the NVIDIA driver supports CUDA $CUDA_MAJOR only; hvdtrain's torch and DALI need a CUDA 12 or newer driver"
fi
HVD_GPU=${HVDTRAIN_HOROVOD_GPU:-$HVD_GPU}
say "horovod: Gloo$([[ "$HVD_GPU" == nccl ]] && echo " + NCCL" || true)"
grep -q "^$DALI_PKG==" constraints.txt || die "constraints.txt has no pin for $DALI_PKG"
BUILD_TOOLS=(setuptools wheel packaging cloudpickle psutil pyyaml)
DEPS=("$DALI_PKG" webdataset numpy pillow nvidia-ml-py pytest pytest-timeout tqdm matplotlib tensorboard safetensors)

# ---- system mode: the names among "$@" that the bootstrap Python (or .venv) lacks
missing_in() {
    local py=$1; shift
    "$py" - "$@" <<'PY'
import importlib.metadata as m, sys
for name in sys.argv[1:]:
    try:
        m.version(name)
    except m.PackageNotFoundError:
        print(name)
PY
}
check_system_torch() {  # the image's torch must import and suit the driver
    local tcuda
    tcuda=$("$BOOT" -c "import torch; print(torch.version.cuda or 'cpu')" 2>/dev/null) \
        || die "HVDTRAIN_TORCH=system but $BOOT cannot import torch"
    say "system torch: $("$BOOT" -c 'import torch; print(torch.__version__)') (CUDA $tcuda) from $BOOT"
    if [[ "$tcuda" != cpu && "$CUDA_MAJOR" != none ]] && ((${tcuda%%.*} > CUDA_MAJOR)); then
        die "the system torch is built for CUDA $tcuda but the driver supports CUDA $CUDA_MAJOR: update the driver or use a torch built for CUDA $CUDA_MAJOR"
    fi
}

if [[ "$TORCH_MODE" == system ]]; then
    check_system_torch
    PYX=$BOOT; [[ -x "$PY" ]] && PYX=$PY
    mapfile -t BUILD_TOOLS < <(missing_in "$PYX" "${BUILD_TOOLS[@]}")
    mapfile -t DEPS < <(missing_in "$PYX" "${DEPS[@]}")
fi
# constraints.txt without the pins of packages `python` already has (system mode keeps the image's)
pins_for_missing() {
    "$1" - constraints.txt <<'PY'
import importlib.metadata as m, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).strip().lower()
have = {norm(d.metadata["Name"] or "") for d in m.distributions()} | {"torch", "triton"}
sys.stdout.writelines(line for line in open(sys.argv[1]) if norm(line.split("==")[0]) not in have)
PY
}

in_venv() {  # is package $1 installed inside .venv itself (not seen through the system site)?
    "$PY" - "$1" 2>/dev/null <<'PY'
import importlib.metadata as m, os, sys
try:
    where = os.path.realpath(m.distribution(sys.argv[1]).locate_file(""))
except m.PackageNotFoundError:
    sys.exit(1)
sys.exit(0 if where.startswith(os.path.realpath(sys.prefix) + os.sep) else 1)
PY
}
venv_site() { "$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])'; }  # .venv's site-packages
make_venv() {
    if [[ "$TORCH_MODE" != system ]]; then "$BOOT" -m venv "$VENV"; return; fi
    # an image's Python may lack ensurepip: then the venv uses the bootstrap's pip
    "$BOOT" -m venv --system-site-packages "$VENV" 2>/dev/null \
        || { rm -rf "$VENV"; "$BOOT" -m venv --system-site-packages --without-pip "$VENV"; } \
        || die "$BOOT could not create $VENV"
    # a venv made from a venv sees only the base interpreter's packages: add the bootstrap's
    # site folders after .venv's own, as site folders (their .pth files count too)
    "$BOOT" -c "import site, sysconfig; p = sysconfig.get_paths(); dirs = list(dict.fromkeys([p['purelib'], p['platlib'], *site.getsitepackages()])); print(f'import site, sys; list(map(site.addsitedir, sorted(set({dirs!r}) - set(sys.path))))')" \
        >"$(venv_site)/_hvdtrain_system.pth"
}
# offline + system: the folder's wheels whose package `python` lacks, installed with
# --no-deps (no index to resolve from; the bundle is complete, install/offline_bundle.sh)
wheels_missing_in() {
    "$1" - "$WHEELS" <<'PY'
import glob, importlib.metadata as m, os, re, sys
norm = lambda s: re.sub(r"[-_.]+", "-", s).strip().lower()
have = {norm(d.metadata["Name"] or "") for d in m.distributions()}
for w in sorted(glob.glob(os.path.join(sys.argv[1], "*.whl"))):
    if norm(os.path.basename(w).split("-")[0]) not in have:
        print(w)
PY
}
install_offline_system() {
    local wheels=() name
    mapfile -t wheels < <(wheels_missing_in "${PYX:-$PY}")
    for name in "${BUILD_TOOLS[@]}" "${DEPS[@]}"; do
        printf '%s\n' "${wheels[@]}" | grep -q -i "/${name//-/_}-" || die "$WHEELS has no wheel for $name"
    done
    if ((${#wheels[@]})); then
        pip_install --no-deps "${wheels[@]}" || die "pip could not install the wheels from $WHEELS"
    fi
    [[ "$DRY" == 1 ]] || "$PY" -m pip check || say "pip check: see above (the image's versions are kept)"
}

# system mode: .venv's nvidia/ and the image's (NCCL, cuDNN, ...) must stay one package
merge_nvidia_namespace() {
    local d
    d=$(venv_site)/nvidia
    [[ -d "$d" ]] || return 0
    if [[ "$DRY" == 1 ]]; then say "would write $d/__init__.py from install/nvidia_namespace.py"; return 0; fi
    cp install/nvidia_namespace.py "$d/__init__.py"
}

STAMP_INPUTS=(constraints.txt setup.py pyproject.toml install/setup.sh install/horovod.sh install/nvidia_namespace.py)
STAMP_KEY=$( { cat "${STAMP_INPUTS[@]}"; echo "$TORCH_MODE $CUDA_MAJOR $HVD_GPU"; "$BOOT" --version; } | sha256sum | cut -c1-16)
STAMP=$VENV/.hvdtrain-setup-$STAMP_KEY

if [[ "$DRY" != 1 && -f "$STAMP" ]] && "$PY" -c "import torch, horovod.torch, nvidia.dali, webdataset, triton, hvdtrain" 2>/dev/null; then
    echo "setup: .venv is up to date ($STAMP_KEY)"
else
    [[ "$DRY" == 1 || -x "$PY" ]] || make_venv
    [[ "$DRY" == 1 ]] || rm -f "$VENV"/.hvdtrain-setup-*
    CONSTRAINTS=$VENV/constraints.txt
    if [[ "$DRY" == 1 ]]; then CONSTRAINTS=constraints.txt
    elif [[ "$TORCH_MODE" == system ]]; then
        # keep the image's torch, the triton that matches it, and every package the image has
        pins_for_missing "$PY" >"$CONSTRAINTS"
    else
        cp constraints.txt "$CONSTRAINTS"
    fi
    if [[ "$TORCH_MODE" == pip ]]; then
        # never let pip resolve an unpinned torch: on a CPU machine that downloads GBs of CUDA
        say "torch: $TORCH_PIN ${TORCH_INDEX[*]:-from the default index}"
        pip_install "${TORCH_INDEX[@]}" "$TORCH_PIN" || die "pip could not install $TORCH_PIN"
    fi
    say "DALI: $(grep "^$DALI_PKG==" constraints.txt)"
    # the other CUDA build of DALI installs the same `nvidia.dali` package: never both in
    # .venv (one the image has is left alone: .venv's comes first on the path)
    for other in nvidia-dali-cuda120 nvidia-dali-cuda130; do
        if [[ "$other" != "$DALI_PKG" && -x "$PY" ]] && in_venv "$other"; then
            if [[ "$DRY" == 1 ]]; then say "would run: pip uninstall -y $other"
            else pipq uninstall -q -y "$other" || die "could not remove $other"; fi
        fi
    done
    if [[ "$TORCH_MODE" == system && -n "$WHEELS" ]]; then
        install_offline_system
    else
        if ((${#BUILD_TOOLS[@]})); then
            pip_install -c "$CONSTRAINTS" "${BUILD_TOOLS[@]}" || die "pip could not install build tools"
        fi
        if ((${#DEPS[@]})); then
            pip_install -c "$CONSTRAINTS" "${DEPS[@]}" || die "pip could not install the dependencies"
        fi
    fi
    [[ "$TORCH_MODE" != system || ! -x "$PY" ]] || merge_nvidia_namespace
    # Triton kernels (kernels/): the GPU path, and the CPU tests through TRITON_INTERPRET=1
    if [[ "$TORCH_MODE" != system ]] || ! "${PYX:-$PY}" -c "import triton" 2>/dev/null; then
        pip_install -c constraints.txt triton || die "pip could not install triton"
    fi
    HOROVOD_PY=$PY; [[ -x "$PY" ]] || HOROVOD_PY=${PYX:-$BOOT}
    PYTHON=$HOROVOD_PY HVDTRAIN_HOROVOD_GPU=$HVD_GPU install/horovod.sh
    [[ "$DRY" == 1 ]] && { say "would run: pip install --no-deps --no-build-isolation -e ."; exit 0; }
    pipq install -q --no-deps --no-build-isolation -e . || die "pip install -e . failed"
    "$PY" -c "import torch, horovod.torch, nvidia.dali, webdataset, hvdtrain" \
        || die "the environment does not import; see the messages above"
    touch "$STAMP"
fi
# ---- extras (HVDTRAIN_EXTRAS, `make setup EXTRAS=remote`): bucket data and the test servers
EXTRAS=${HVDTRAIN_EXTRAS:-}
EXTRA_PKGS=()
for extra in $EXTRAS; do
    case "$extra" in
        remote) EXTRA_PKGS+=(boto3 google-cloud-storage) ;;
        test)   EXTRA_PKGS+=(boto3 google-cloud-storage "moto[server]" gcp-storage-emulator) ;;
        *) die "HVDTRAIN_EXTRAS: unknown extra '$extra' (remote, test)" ;;
    esac
done
if ((${#EXTRA_PKGS[@]})); then
    EXTRA_STAMP=$VENV/.hvdtrain-extras-$( { echo "${EXTRA_PKGS[*]}"; cat constraints.txt; } | sha256sum | cut -c1-16)
    if [[ "$DRY" == 1 ]]; then
        pip_install -c constraints.txt "${EXTRA_PKGS[@]}"
    elif [[ ! -f "$EXTRA_STAMP" ]]; then
        say "extras ($EXTRAS): ${EXTRA_PKGS[*]}"
        pip_install -c constraints.txt "${EXTRA_PKGS[@]}" || die "pip could not install the extras: ${EXTRA_PKGS[*]}"
        touch "$EXTRA_STAMP"
    fi
fi
"$PY" -c "import torch, nvidia.dali as d, horovod; print(f'setup: torch {torch.__version__}, DALI {d.__version__}, horovod {horovod.__version__}, CUDA {torch.version.cuda or \"none\"}')"
"$VENV/bin/horovodrun" --check-build
