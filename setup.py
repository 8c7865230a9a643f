"""hvdtrain's package metadata: the one place for names, version, packages, extras and
the commands users type. Dependency versions live in constraints.txt (the one place for
pins), which `make setup` (install/setup.sh) installs with.

    make setup                     # what a newcomer runs: .venv with every pin and horovod
    pip install -e . -c constraints.txt        # into an environment you manage
    python setup.py --version

torch and horovod are deliberately not dependencies: an unpinned torch on a CPU machine
pulls GBs of CUDA packages, and horovod must be built against the torch that is
installed, with a C++17 patch (install/horovod.sh). DALI comes in an extra per
CUDA major version (`cuda12` also serves CPU-only machines through its CPU backend).
"""
import os
import re

from setuptools import setup

HERE = os.path.dirname(os.path.abspath(__file__))


def version() -> str:
    text = open(os.path.join(HERE, "hvdtrain", "__init__.py")).read()
    return re.search(r'^__version__ = "([^"]+)"', text, re.M).group(1)


# names only: constraints.txt pins every one of them (tests/unit/test_packaging.py checks)
REQUIRES = ["numpy", "pillow", "webdataset", "nvidia-ml-py", "tqdm", "matplotlib", "tensorboard", "psutil",
            "safetensors"]
EXTRAS = {
    "cuda12": ["nvidia-dali-cuda120"],   # DALI for CUDA 12 drivers, and the CPU backend on machines with no GPU
    "cuda13": ["nvidia-dali-cuda130"],   # DALI for CUDA 13 drivers
    "kernels": ["triton"],               # the Triton kernels (kernels/); interpreted on the CPU in tests
    "remote": ["boto3", "google-cloud-storage"],  # shards in s3:// and gs:// buckets (data/remote.py)
    "test": ["pytest", "pytest-timeout", "moto[server]", "gcp-storage-emulator"],  # + the real store servers
}
# the commands users type, beside their `python -m` forms (which stay)
COMMANDS = {
    "hvdtrain-sanity": "hvdtrain.sanity:main",
    "hvdtrain-train": "hvdtrain.train:main",
    "hvdtrain-evaluate": "hvdtrain.evaluate:main",
    "hvdtrain-export": "hvdtrain.export:main",
    "hvdtrain-synth": "hvdtrain.data.synth:main",
    "hvdtrain-make-shards": "hvdtrain.data.make_shards:main",
    "hvdtrain-verify": "hvdtrain.data.verify:main",
    "hvdtrain-bench-loader": "hvdtrain.bench.loader:main",
    "hvdtrain-bench-throughput": "hvdtrain.bench.throughput:main",
    "hvdtrain-bench-allreduce": "hvdtrain.bench.allreduce:main",
    "hvdtrain-bench-kernels": "hvdtrain.bench.kernels:main",
}

setup(
    name="hvdtrain",
    version=version(),
    description="DALI on WebDataset shards + Horovod data-parallel training, with honest SLO reports",
    long_description=open(os.path.join(HERE, "README.md")).read().split("\n\n")[1],
    python_requires=">=3.11",  # tomllib reads the presets (hvdtrain/presets/*.toml)
    # one namespace: the repository's data/, kernels/ and bench/ install as hvdtrain.data,
    # hvdtrain.kernels and hvdtrain.bench (from a checkout, `python -m data.make_shards` still
    # works: its modules import hvdtrain.data.*). launch/, install/, gpucheck/ and tests/ stay in
    # the checkout: an installed hvdtrain claims no other top-level name.
    packages=["hvdtrain", "hvdtrain.data", "hvdtrain.kernels", "hvdtrain.bench"],
    package_dir={"hvdtrain": "hvdtrain", "hvdtrain.data": "data", "hvdtrain.kernels": "kernels",
                 "hvdtrain.bench": "bench"},
    package_data={"hvdtrain": ["presets/*.toml"]},
    install_requires=REQUIRES,
    extras_require=EXTRAS,
    entry_points={"console_scripts": [f"{k}={v}" for k, v in COMMANDS.items()]},
)
