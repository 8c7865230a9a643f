"""install/setup.sh's GPU choices, on the CPU: a fake `nvidia-smi` on PATH says which driver
the machine has, and the dry run (HVDTRAIN_SETUP_DRY_RUN=1) prints the packages, pip
commands and horovod build flags it would use. Nothing is installed: .venv is read, never
written, and no network is used."""
import importlib.util
import os
import re
import shutil
import stat
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT
from tests.e2e.harness import run

SMI_HEADER = """+-----------------------------------------------------------------------------------------+
| NVIDIA-SMI 580.159.04             Driver Version: 580.159.04     CUDA Version: {cuda}     |
+-----------------------------------------+------------------------+----------------------+
| GPU  Name                 Persistence-M | Bus-Id          Disp.A | Volatile Uncorr. ECC |
|   0  NVIDIA H100 80GB HBM3          On  |   00000000:00:07.0 Off |                    0 |
"""
NO_DRIVER = "NVIDIA-SMI has failed because it couldn't communicate with the NVIDIA driver."


def fake_smi(folder, cuda: str | None) -> str:
    """An `nvidia-smi` that prints a CUDA `cuda` driver's header, or fails like one with no driver."""
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "nvidia-smi")
    body = f"cat <<'EOF'\n{SMI_HEADER.format(cuda=cuda)}EOF\n" if cuda else f"echo \"{NO_DRIVER}\"\nexit 9\n"
    with open(path, "w") as f:
        f.write("#!/bin/sh\n" + body)
    os.chmod(path, os.stat(path).st_mode | stat.S_IEXEC)
    return str(folder)


def venv_state():
    venv = os.path.join(ROOT, ".venv")
    return sorted(os.listdir(venv)) if os.path.isdir(venv) else None


def dry_run(tmp_path, cuda, **env_extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HVDTRAIN_", "HOROVOD_"))}
    env.update(PATH=fake_smi(tmp_path / "bin", cuda) + os.pathsep + env["PATH"], HVDTRAIN_SETUP_DRY_RUN="1",
               HVDTRAIN_TORCH="pip", HVDTRAIN_CACHE=str(tmp_path / "cache"), PYTHON_BOOTSTRAP=sys.executable)
    env.update(env_extra)
    before = venv_state()
    r = run(["bash", os.path.join(ROOT, "install", "setup.sh")], timeout=120, env=env)
    assert venv_state() == before and not (tmp_path / "cache").exists(), "a dry run changed something"
    return r


def pip_commands(out: str) -> list[str]:
    return re.findall(r"would run: (pip install .*)", out)


def test_cuda13_driver_picks_dali_cuda130_pypi_torch_and_nccl(tmp_path):
    r = dry_run(tmp_path, "13.0")
    assert r.returncode == 0, r.stderr
    cmds = pip_commands(r.stdout)
    assert "pip install torch==2.13.0" in cmds  # PyPI's torch 2.13.0 is the CUDA 13 build
    assert any(c.startswith("pip install -c constraints.txt nvidia-dali-cuda130 ") for c in cmds)
    assert not any("nvidia-dali-cuda120" in c for c in cmds)
    assert "DALI: nvidia-dali-cuda130==2.4.0" in r.stdout
    assert "GPU operations: nccl" in r.stdout and "HOROVOD_GPU_OPERATIONS=NCCL" in r.stdout


def test_cuda12_driver_picks_dali_cuda120_and_torchs_cuda12_index(tmp_path):
    r = dry_run(tmp_path, "12.8")
    assert r.returncode == 0, r.stderr
    cmds = pip_commands(r.stdout)
    assert "pip install --index-url https://download.pytorch.org/whl/cu126 torch==2.13.0" in cmds
    assert any(c.startswith("pip install -c constraints.txt nvidia-dali-cuda120 ") for c in cmds)
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in r.stdout


def test_no_driver_keeps_the_cpu_choices(tmp_path):
    r = dry_run(tmp_path, None)
    assert r.returncode == 0, r.stderr
    assert "no NVIDIA GPU driver" in r.stdout
    assert any("nvidia-dali-cuda120" in c for c in pip_commands(r.stdout))
    assert "GPU operations: none" in r.stdout and "HOROVOD_GPU_OPERATIONS" not in r.stdout


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None, reason="this machine has a real nvidia-smi")
def test_no_nvidia_smi_at_all_is_the_cpu_path(tmp_path):
    r = dry_run(tmp_path, None, PATH=os.environ["PATH"])
    assert r.returncode == 0 and "no NVIDIA GPU driver" in r.stdout, r.stdout + r.stderr


def test_old_driver_stops_with_a_reason(tmp_path):
    r = dry_run(tmp_path, "11.4")
    assert r.returncode == 1 and "CUDA 12 or newer driver" in r.stderr


def test_system_torch_offline_installs_only_the_missing_wheels(tmp_path):
    """A cluster image (here: this venv's Python) keeps its packages; from a wheel folder
    (no index: install/offline_install.sh) pip adds only the wheels of packages it lacks."""
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    names = ["nvidia_dali_cuda130-2.4.0-py3-none-manylinux_2_28_x86_64.whl",
             "numpy-2.4.6-cp312-cp312-manylinux_2_28_x86_64.whl"]  # numpy: the image has it
    for n in names:
        (wheels / n).write_bytes(b"")
    r = dry_run(tmp_path, "13.0", HVDTRAIN_TORCH="system", HVDTRAIN_WHEELS=str(wheels))
    assert r.returncode == 0, r.stderr
    assert "system torch:" in r.stdout
    cmds = [c for c in pip_commands(r.stdout) if not c.endswith(" -e .")]  # -e . needs no index
    assert cmds == [f"pip install --no-index --find-links {wheels} --no-deps {wheels / names[0]}"]
    (wheels / names[0]).unlink()
    r = dry_run(tmp_path, "13.0", HVDTRAIN_TORCH="system", HVDTRAIN_WHEELS=str(wheels))
    assert r.returncode == 1 and f"{wheels} has no wheel for nvidia-dali-cuda130" in r.stderr


def test_nccl_build_names_what_is_missing(tmp_path):
    """Not a dry run: install_horovod.sh stops before building, naming nvcc (not on PATH,
    no CUDA home) and, on a CPU machine, NCCL."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HVDTRAIN_", "HOROVOD_", "CUDA_"))}
    no_nvcc = [p for p in env["PATH"].split(os.pathsep) if not os.path.exists(os.path.join(p, "nvcc"))]
    env.update(PATH=os.pathsep.join(no_nvcc), PYTHON=sys.executable, HVDTRAIN_HOROVOD_GPU="nccl",
               HVDTRAIN_CUDA_DEFAULT=str(tmp_path / "no-cuda"), HVDTRAIN_CACHE=str(tmp_path / "cache"))
    r = run(["bash", os.path.join(ROOT, "install", "horovod.sh")], timeout=120, env=env)
    assert r.returncode == 1
    assert "cannot build horovod with NCCL: missing nvcc" in r.stderr
    if importlib.util.find_spec("nvidia.nccl") is None:  # a CPU torch brings no NCCL
        assert "NCCL (nccl.h and libnccl.so.2" in r.stderr
    assert "HVDTRAIN_HOROVOD_GPU=none" in r.stderr
    assert not (tmp_path / "cache").exists()


def test_the_two_dali_builds_are_pinned_to_one_version():
    pins = dict(line.strip().split("==") for line in open(os.path.join(ROOT, "constraints.txt"))
                if "==" in line and not line.startswith("#"))
    assert pins["nvidia-dali-cuda120"] == pins["nvidia-dali-cuda130"]


def fake_sites(tmp_path, venv_init: str) -> tuple:
    """A .venv site with DALI's nvidia/ (and `venv_init` as its nvidia/__init__.py) before an
    image's site with NCCL's nvidia/ (a regular package there too)."""
    venv, image = tmp_path / "venv-site", tmp_path / "image-site"
    (venv / "nvidia" / "dali").mkdir(parents=True)
    (venv / "nvidia" / "dali" / "__init__.py").write_text("")
    (venv / "nvidia" / "__init__.py").write_text(venv_init)
    for sub in ("include", "lib"):
        (image / "nvidia" / "nccl" / sub).mkdir(parents=True)
    (image / "nvidia" / "__init__.py").write_text("")
    (image / "nvidia" / "nccl" / "include" / "nccl.h").write_text("")
    (image / "nvidia" / "nccl" / "lib" / "libnccl.so.2").write_text("")
    return venv, image


def test_the_venvs_nvidia_folder_does_not_hide_the_images(tmp_path):
    """nvjpeg2k's and nvtiff's wheels ship an empty nvidia/__init__.py: where pip leaves one
    in .venv, it hides the image's nvidia/ (nvidia.nccl). setup.sh copies
    install/nvidia_namespace.py over it in system mode, whatever pip's order."""
    probe = "import importlib.util, nvidia.dali; print(importlib.util.find_spec('nvidia.nccl') is not None)"
    for init, seen in (("", "False"), (open(os.path.join(ROOT, "install", "nvidia_namespace.py")).read(), "True")):
        venv, image = fake_sites(tmp_path / seen, init)
        r = run([sys.executable, "-c", probe], timeout=60,
                env=dict(os.environ, PYTHONPATH=f"{venv}{os.pathsep}{image}"))
        assert r.returncode == 0 and r.stdout.strip() == seen, r.stderr


def test_nccl_is_found_by_path_even_when_hidden_from_import(tmp_path):
    """install_horovod.sh looks for nvidia/nccl/include/nccl.h on sys.path, not by import."""
    venv, image = fake_sites(tmp_path, "")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HVDTRAIN_", "HOROVOD_"))}
    env.update(PYTHON=sys.executable, HVDTRAIN_HOROVOD_GPU="nccl", HVDTRAIN_SETUP_DRY_RUN="1",
               PYTHONPATH=f"{venv}{os.pathsep}{image}", HVDTRAIN_CACHE=str(tmp_path / "cache"))
    r = run(["bash", os.path.join(ROOT, "install", "horovod.sh")], timeout=120, env=env)
    assert r.returncode == 0, r.stderr
    assert f"HOROVOD_NCCL_INCLUDE={image}/nvidia/nccl/include" in r.stdout
    assert "NCCL (nccl.h" not in r.stdout


def test_a_second_horovod_build_waits_for_the_first_and_reuses_its_wheel(tmp_path):
    """The build lock: set-up started while a background build (install/offline_install.sh
    --horovod) holds it waits, then takes the wheel that build cached, instead of building again."""
    sdist = tmp_path / "horovod-0.28.1.tar.gz"
    sdist.write_bytes(b"not a tar")  # a first build that fails at once names its cache key
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HVDTRAIN_", "HOROVOD_"))}
    env.update(PYTHON=sys.executable, HVDTRAIN_HOROVOD_GPU="none", HVDTRAIN_HOROVOD_SDIST=str(sdist),
               HVDTRAIN_CACHE=str(tmp_path / "cache"), HVDTRAIN_HOROVOD_BUILD_ONLY="1")
    script = os.path.join(ROOT, "install", "horovod.sh")
    r = run(["bash", script], timeout=120, env=env)
    assert r.returncode == 1 and "horovod build failed" in r.stderr
    key = re.search(r"logs/(horovod-[^ ]+)\.log", r.stdout).group(1)
    wheel_dir = tmp_path / "cache" / "wheels" / key
    wheel_dir.mkdir()
    (wheel_dir / "horovod-0.28.1-cp311-cp311-linux_x86_64.whl").write_bytes(b"")  # what the first build left
    # the first build, still running: holds the lock until its stdin closes
    holder = subprocess.Popen(["flock", str(tmp_path / "cache" / "wheels" / ".build.lock"), "cat"],
                              stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    second = subprocess.Popen(["bash", script], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        first_line = ""
        deadline = time.monotonic() + 60
        while "another horovod build holds" not in first_line and time.monotonic() < deadline:
            first_line = second.stdout.readline() or first_line
        assert "another horovod build holds" in first_line, "the second build did not wait on the lock"
        assert second.poll() is None  # it waits
        holder.stdin.close()  # the first build ends
        out, err = second.communicate(timeout=60)
    finally:
        for p in (holder, second):
            if p.poll() is None:
                p.kill()
    assert second.returncode == 0, err
    assert f"reusing cached wheel {wheel_dir}" in out and "built only (HVDTRAIN_HOROVOD_BUILD_ONLY=1)" in out
