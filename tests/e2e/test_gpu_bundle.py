"""The offline install, on the CPU: install/offline_bundle.sh packs and splits;
install/offline_install.sh joins, checks and hands the wheels to set-up;
install/offline_check.sh sets up, then checks, into one folder. With a small bundle of real
(tiny) wheels and a fake `nvidia-smi` for a CUDA 13 driver. No network: the bundle is
packed from a folder (--from) and set-up runs dry."""
import os
import shutil
import sys
import time
import zipfile

import pytest
import torch

from tests.conftest import ROOT
from tests.e2e.harness import run
from tests.e2e.test_setup_dry_run import fake_smi


def make_wheel(folder, name: str, version: str, requires=(), filler_bytes: int = 6000) -> str:
    dist = f"{name.replace('-', '_')}-{version}"
    path = os.path.join(folder, f"{dist}-py3-none-any.whl")
    meta = f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n" + "".join(
        f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:  # stored, not deflated: the filler keeps its size
        z.writestr(f"{dist}.dist-info/METADATA", meta)
        z.writestr(f"{dist}.dist-info/filler", os.urandom(filler_bytes))
    return path


def make_ext_wheel(folder) -> str:
    """A wheel with one extension module per CPython version, as DALI's and nvImageCodec's."""
    dist = "nvidia_nvimgcodec_cu13-0.9.0.20"
    path = os.path.join(folder, f"{dist}-py3-none-manylinux_2_28_x86_64.whl")
    names = [f"nvidia/nvimgcodec/impl.cpython-{v}-x86_64-linux-gnu.so" for v in ("311", "312", "313", "314t")]
    names += ["nvidia/__init__.py", "nvidia/libnvcomp/bin/nvlzcat"]
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        z.writestr(f"{dist}.dist-info/METADATA", "Metadata-Version: 2.1\nName: nvidia-nvimgcodec-cu13\nVersion: 0.9.0.20\n")
        for n in names:
            z.writestr(n, b"\0" * 1000)
        z.writestr(f"{dist}.dist-info/RECORD", "".join(f"{n},sha256=x,1000\n" for n in names))
    return path


PART_MIB = str(4096 / 2**20)  # 4 KiB parts: several from a bundle of tiny wheels


def pack(src, out, *args):
    env = dict(os.environ, HVDTRAIN_BUNDLE_DIR=str(out), PYTHON=sys.executable)
    return run(["bash", os.path.join(ROOT, "install", "offline_bundle.sh"), "--from", str(src), "--xz", "1", *args],
               timeout=60, env=env)


@pytest.fixture
def bundle(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    dali = make_wheel(src, "nvidia-dali-cuda130", "2.4.0",
                      ["numpy", "gast<=0.7.0,>=0.3.3", "pyyaml-ft; python_version >= '3.13'"])
    make_wheel(src, "numpy", "2.4.6")  # the image has numpy: it must not be installed
    make_ext_wheel(src)
    (src / "horovod-0.28.1.tar.gz").write_bytes(os.urandom(3000))
    out = tmp_path / "bundle"
    r = pack(src, out, "--part-mib", PART_MIB)
    assert r.returncode == 0, r.stderr
    assert "the image must already have: gast, numpy" not in r.stdout  # numpy is in the bundle
    assert "the image must already have: gast\n" in r.stdout  # pyyaml-ft's marker is false on 3.12
    return out, os.path.basename(dali), tmp_path


def install(tmp_path, out, *args, script="offline_install.sh", **extra):
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HVDTRAIN_", "HOROVOD_"))}
    env.update(PATH=fake_smi(tmp_path / "bin", "13.0") + os.pathsep + env["PATH"], HVDTRAIN_BUNDLE_DIR=str(out),
               HVDTRAIN_SETUP_DRY_RUN="1", PYTHON_BOOTSTRAP=sys.executable, HVDTRAIN_CACHE=str(tmp_path / "cache"))
    env.update(extra)
    return run(["bash", os.path.join(ROOT, "install", script), *args], timeout=120, env=env)


def test_parts_join_check_and_install_only_what_the_image_lacks(bundle):
    out, dali, tmp_path = bundle
    parts = sorted(p for p in os.listdir(out) if p.startswith("p"))
    assert len(parts) >= 3 and all(os.path.getsize(out / p / f"bundle.tar.xz.part-{p[1:]}") <= 4096 for p in parts)
    assert os.listdir(out / "p00").count("horovod-0.28.1.tar.gz") == 1  # the sdist travels first, whole
    r = install(tmp_path, out)
    assert r.returncode == 0, r.stdout + r.stderr
    wheels = out / "wheels"
    codec = wheels / "nvidia_nvimgcodec_cu13-0.9.0.20-py3-none-manylinux_2_28_x86_64.whl"
    assert f"pip install --no-index --find-links {wheels} --no-deps {wheels / dali} {codec}\n" in r.stdout
    assert "numpy-2.4.6" not in r.stdout
    assert f"sdist: {wheels}/horovod-0.28.1.tar.gz" in r.stdout  # horovod builds from the bundle
    assert "HOROVOD_GPU_OPERATIONS=NCCL" in r.stdout
    # the wheels travel slimmed to one CPython: extension modules of other versions and
    # nvCOMP's tools stay behind, RECORD forgets them, the rest is intact (stored, for xz)
    with zipfile.ZipFile(codec) as z:
        names = set(z.namelist())
        record = z.read("nvidia_nvimgcodec_cu13-0.9.0.20.dist-info/RECORD").decode()
        assert {i.compress_type for i in z.infolist()} == {zipfile.ZIP_STORED}
    assert "nvidia/nvimgcodec/impl.cpython-312-x86_64-linux-gnu.so" in names and "nvidia/__init__.py" in names
    for gone in ("impl.cpython-311-", "impl.cpython-313-", "impl.cpython-314t-", "nvlzcat"):
        assert not any(gone in n for n in names) and gone not in record


def test_the_horovod_build_starts_with_p00_alone(bundle):
    """--horovod needs only p00: the build starts in a new session and returns at once
    (here a dry run, which prints the flags and the sdist it would build)."""
    out, _, tmp_path = bundle
    for p in os.listdir(out):
        if p.startswith("p") and p != "p00":
            shutil.rmtree(out / p)
    r = install(tmp_path, out, "--horovod")
    assert r.returncode == 0 and "horovod build started in the background" in r.stdout, r.stdout + r.stderr
    log = tmp_path / "cache" / "logs" / "horovod-background.log"
    deadline = time.monotonic() + 60
    while "sdist:" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
        time.sleep(0.2)
    assert f"sdist: {out}/p00/horovod-0.28.1.tar.gz" in log.read_text()
    r = install(tmp_path, out)
    assert r.returncode == 1 and "lacks part folder(s) p01" in r.stderr


def test_a_damaged_sdist_is_named(bundle):
    out, _, tmp_path = bundle
    (out / "p00" / "horovod-0.28.1.tar.gz").write_bytes(b"truncated")
    r = install(tmp_path, out, "--horovod")
    assert r.returncode == 1 and "horovod-0.28.1.tar.gz is missing or fails its sha256: copy p00 again" in r.stderr


def test_a_missing_part_is_named(bundle):
    out, _, tmp_path = bundle
    for f in os.listdir(out / "p01"):
        os.remove(out / "p01" / f)
    os.rmdir(out / "p01")
    r = install(tmp_path, out)
    assert r.returncode == 1 and "lacks part folder(s) p01 of" in r.stderr


def test_a_damaged_part_fails_the_checksum(bundle):
    out, _, tmp_path = bundle
    part = out / "p00" / "bundle.tar.xz.part-00"
    data = bytearray(part.read_bytes())
    data[700] ^= 0xFF
    part.write_bytes(bytes(data))
    r = install(tmp_path, out)
    assert r.returncode == 1 and "do not match the bundle's sha256" in r.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_the_node_command_sets_up_then_checks_into_one_folder(bundle):
    """install/offline_check.sh --out DIR: set-up's log and gpu-check's report land in DIR;
    a set-up that fails stops there, with its log's tail; with no GPU gpu-check exits 2."""
    out, _, tmp_path = bundle
    dest = tmp_path / "out"
    r = install(tmp_path, out, "--budget-s", "300", "--out", str(dest), script="offline_check.sh")
    assert r.returncode == 2 and "no GPU: nothing to check" in r.stdout, r.stdout + r.stderr
    assert "gpu-check gets the" in r.stdout and "gpu_install: 4 files" in (dest / "setup.log").read_text()
    shutil.rmtree(out / "p01")
    r = install(tmp_path, out, "--out", str(dest), script="offline_check.sh")
    assert r.returncode == 1 and "set-up failed" in r.stdout and "lacks part folder(s) p01" in r.stdout


def test_a_manifest_of_the_old_format_is_named(tmp_path):
    """A manifest without the sdist's line (not one install/offline_bundle.sh wrote) stops with a message."""
    (tmp_path / "b" / "p00").mkdir(parents=True)
    (tmp_path / "b" / "p00" / "bundle.manifest").write_text("parts 1\nsha256 abc\n")
    r = install(tmp_path, tmp_path / "b", "--horovod")
    assert r.returncode == 1 and "is not a bundle manifest of install/offline_bundle.sh" in r.stderr


def test_one_part_by_default(tmp_path):
    """Without --part-mib the bundle is one part in p00, beside the sdist: one folder to copy."""
    src = tmp_path / "src"
    src.mkdir()
    make_wheel(src, "webdataset", "1.0.2")
    (src / "horovod-0.28.1.tar.gz").write_bytes(os.urandom(3000))
    r = pack(src, tmp_path / "bundle")
    assert r.returncode == 0, r.stderr
    assert sorted(os.listdir(tmp_path / "bundle")) == ["p00"]
    assert sorted(os.listdir(tmp_path / "bundle" / "p00")) == \
        ["bundle.manifest", "bundle.tar.xz.part-00", "horovod-0.28.1.tar.gz"]
    assert "python 3.12\ncuda 13\n" in (tmp_path / "bundle" / "p00" / "bundle.manifest").read_text()
    r = pack(src, tmp_path / "bundle", "--cuda", "11")
    assert r.returncode == 1 and "--cuda takes 12 or 13" in r.stderr


def test_a_bundle_for_another_python_is_refused_before_anything_is_set_up(bundle):
    """The bundle holds wheels for one CPython: on a node whose Python differs the install
    stops at once, naming the option to build the right one (a dry run says it would)."""
    out, _, tmp_path = bundle
    for manifest in out.glob("p*/bundle.manifest"):
        manifest.write_text(manifest.read_text().replace("python 3.12\n", "python 3.0\n"))
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    r = install(tmp_path, out, HVDTRAIN_SETUP_DRY_RUN="0")
    assert r.returncode == 1, r.stdout + r.stderr
    assert f"the bundle is for CPython 3.0 but {sys.executable} is {here}: build it again with " \
           f"install/offline_bundle.sh --python {here}" in r.stderr
    assert not (out / "wheels").exists() and not (tmp_path / "cache").exists()
    r = install(tmp_path, out)
    assert r.returncode == 0 and "(dry run): would stop here: the bundle is for CPython 3.0" in r.stdout
