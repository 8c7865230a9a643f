"""setup.py installs the package users were promised, and its console scripts run;
constraints.txt pins every dependency setup.py names."""
import os
import re
import shutil
import subprocess
import sys

import pytest

from tests.conftest import ROOT



def setup_metadata():
    """REQUIRES, EXTRAS and COMMANDS from setup.py, read without running setup()."""
    ns = {}
    src = open(os.path.join(ROOT, "setup.py")).read().split("\nsetup(")[0]
    exec(compile(src, "setup.py", "exec"), {"__file__": os.path.join(ROOT, "setup.py")}, ns)  # noqa: S102
    return ns


def test_constraints_pin_every_dependency_setup_names():
    ns = setup_metadata()
    pins = dict(re.findall(r"^([A-Za-z0-9_.-]+)==(\S+)", open(os.path.join(ROOT, "constraints.txt")).read(), re.M))
    names = [re.sub(r"\[.*\]$", "", n) for n in ns["REQUIRES"] + [n for v in ns["EXTRAS"].values() for n in v]]
    assert [n for n in names if n not in pins] == []
    assert not any(re.search(r"[<>=]", n) for n in names), "versions belong in constraints.txt, not setup.py"


def test_version_has_one_home():
    import hvdtrain

    out = subprocess.run([sys.executable, "setup.py", "--version"], cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == hvdtrain.__version__


def test_installed_hvdtrain_claims_one_name_beside_a_users_own_data_and_kernels(tmp_path):
    """A fresh venv, `pip install` of a copy of the checkout (its dependencies seen from
    this venv, after the fresh one's own site-packages), then hvdtrain used from a project
    folder that has its own `data` and `kernels` packages: both are there and neither
    shadows the other; the console scripts run."""
    import sysconfig

    src, venv, work = tmp_path / "src", tmp_path / "venv", tmp_path / "project"
    # a copy: setuptools would leave build/ and an egg-info in the checkout
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".gpu-bundle"))
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=120)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", str(src)], capture_output=True,
                       text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    site = subprocess.run([str(py), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                          capture_output=True, text=True, check=True).stdout.strip()
    assert sorted(n for n in os.listdir(site) if not n.endswith((".dist-info", ".pth", "-info")) and n not in
                  ("pip", "setuptools", "_distutils_hack", "pkg_resources", "__pycache__")) == ["hvdtrain"]
    with open(os.path.join(site, "zz-deps.pth"), "w") as f:  # numpy, PIL, ... from this venv, after its own
        f.write(sysconfig.get_paths()["purelib"] + "\n")
    for pkg in ("data", "kernels"):
        (work / pkg).mkdir(parents=True)
        (work / pkg / "__init__.py").write_text(f'MARK = "the user\'s own {pkg}"\n')
    r = subprocess.run([str(py), "-c", "import data, kernels, hvdtrain.data.shards as s, hvdtrain.kernels as k; "
                                      "print(data.MARK, '|', kernels.MARK, '|', s.__file__, '|', k.__file__)"],
                       cwd=work, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    mine, theirs, shards, kern = [x.strip() for x in r.stdout.split("|")]
    assert mine == "the user's own data" and theirs == "the user's own kernels"
    assert shards.startswith(site) and kern.startswith(site)
    for cmd in setup_metadata()["COMMANDS"]:
        assert (venv / "bin" / cmd).exists(), cmd
    r = subprocess.run([str(venv / "bin" / "hvdtrain-synth"), str(work / "d"), "--classes", "2", "--train", "6",
                        "--val", "2", "--size", "16", "--seed", "1"], cwd=work, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(venv / "bin" / "hvdtrain-verify"), str(work / "d" / "train")], cwd=work,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "6 samples, 0 bad sample(s)" in r.stdout, r.stdout + r.stderr


@pytest.mark.parametrize("script", ["hvdtrain-sanity", "hvdtrain-bench-loader", "hvdtrain-evaluate", "hvdtrain-export"])
def test_commands_map_to_entry_points_that_exist(script):
    import importlib

    mod, func = setup_metadata()["COMMANDS"][script].split(":")
    assert callable(getattr(importlib.import_module(mod), func))
