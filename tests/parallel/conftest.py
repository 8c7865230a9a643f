"""Runs under `horovodrun -np 2 python -m pytest tests/parallel`: every rank runs every
test; assertions are written in terms of size(). Data is made by rank 0 in a folder
whose path is broadcast. The GPUs are hidden (Makefile): two ranks would need two GPUs,
and these tests are the CPU path's; `make gpu-check` runs the GPU one."""
import os
import shutil
import tempfile

import pytest

from hvdtrain import dist


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    """`--junitxml=X.xml` under horovodrun: each rank writes its own X.rank<N>.xml (one file
    written by two ranks at once is torn). Before pytest's junitxml plugin reads the path."""
    path, rank = getattr(config.option, "xmlpath", None), os.environ.get("HOROVOD_RANK")
    if path and rank is not None:
        root, ext = os.path.splitext(path)
        config.option.xmlpath = f"{root}.rank{rank}{ext or '.xml'}"


@pytest.fixture(scope="session", autouse=True)
def hvd_session():
    dist.init()
    yield
    dist.barrier()


@pytest.fixture(scope="session")
def shared_dir():
    path = tempfile.mkdtemp(prefix="hvdtrain-par-") if dist.is_primary() else None
    path = dist.broadcast_object(path, name="shared_dir")
    yield path
    dist.barrier()
    if dist.is_primary():
        shutil.rmtree(path, ignore_errors=True)
