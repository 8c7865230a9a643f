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


def test_install_and_run_a_console_script(tmp_path):
    """pip install --no-deps --target: a wheel built from setup.py, then the commands it
    installed, run from outside the repository so they import the installed copy."""
    target, src = tmp_path / "site", tmp_path / "src"
    # built from a copy: setuptools would leave build/ and an egg-info in the checkout, and a
    # stale build/ can ship modules the tree no longer has
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".git", ".venv", "runs", "build", "*.egg-info",
                                                             "__pycache__", ".gpu-bundle"))
    r = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--target", str(target), str(src)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    for cmd in setup_metadata()["COMMANDS"]:
        assert (target / "bin" / cmd).exists(), cmd
    assert (target / "launch" / "slurm_run.sh").exists()
    assert sorted(p.name for p in (target / "hvdtrain" / "presets").glob("*.toml")) == [
        "ci.toml", "resnet50.toml", "sanity.toml", "tinyimagenet.toml"]
    env = {**os.environ, "PYTHONPATH": str(target)}
    work = tmp_path / "elsewhere"
    work.mkdir()
    r = subprocess.run([str(target / "bin" / "hvdtrain-synth"), str(work / "d"), "--classes", "2", "--train", "6",
                        "--val", "2", "--size", "16", "--seed", "1"], cwd=work, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    r = subprocess.run([str(target / "bin" / "hvdtrain-verify"), str(work / "d" / "train")], cwd=work, env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "6 samples, 0 bad sample(s)" in r.stdout, r.stdout + r.stderr
    r = subprocess.run([sys.executable, "-c", "import data.synth; print(data.synth.__file__)"], cwd=work, env=env,
                       capture_output=True, text=True, timeout=60)
    assert r.stdout.strip().startswith(str(target)), r.stdout  # the installed copy, not the checkout
    r = subprocess.run([sys.executable, "-c", "from hvdtrain import config as C; print(C.preset('ci').train.steps)"],
                       cwd=work, env=env, capture_output=True, text=True, timeout=60)
    assert r.stdout.strip() == "40", r.stdout + r.stderr  # a preset read from the installed package data


@pytest.mark.parametrize("script", ["hvdtrain-sanity", "hvdtrain-bench-loader", "hvdtrain-evaluate", "hvdtrain-export"])
def test_commands_map_to_entry_points_that_exist(script):
    import importlib

    mod, func = setup_metadata()["COMMANDS"][script].split(":")
    assert callable(getattr(importlib.import_module(mod), func))
