"""A run lets go of its loaders when it ends: the DALI pipelines (and the one a thread is
building for the next epoch) are gone before the entry point's final barrier and exit,
not left to interpreter shutdown, where DALI can abort with CUDA (NVIDIA/DALI#6166)."""
import gc
import os
import threading
import weakref

import pytest

from hvdtrain import config as C
from hvdtrain import session


@pytest.fixture(scope="module")
def hvd():
    from hvdtrain import dist

    dist.init()  # one rank: no launcher
    return dist


def test_leaving_a_run_releases_its_loaders_and_every_pipeline(hvd, synth_data, tmp_path):
    cfg = C.preset("ci")
    cfg.data.train, cfg.data.val = os.path.join(synth_data, "train"), os.path.join(synth_data, "val")
    cfg.data.shard_shuffle = "on"  # a new pipeline per epoch, built ahead in a thread
    cfg.run.dir, cfg.run.progress, cfg.run.tensorboard = str(tmp_path / "run"), False, False
    with session.Run(cfg, checkpoints=False) as run:
        it = run.loader.forever()
        for _ in range(len(run.loader) - 1):  # the next epoch's pipeline is being built now
            next(it)
        assert run.loader._next is not None
        pipes = [weakref.ref(run.loader.pipe), weakref.ref(run.val_loader.pipe)]
        del it
    gc.collect()
    assert run.loader is None and run.val_loader is None
    assert [p() for p in pipes] == [None, None], "a pipeline outlived its run"
    assert not any(t.name == "hvdtrain-next-part" and t.is_alive() for t in threading.enumerate())
