"""Runs under `horovodrun -np 2 python -m pytest tests/parallel`: every rank runs every
test; assertions are written in terms of size(). Data is made by rank 0 in a folder
whose path is broadcast."""
import shutil
import tempfile

import pytest

from hvdtrain import dist


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
