"""--data.loader=synthetic: batches of the config's shapes made on the device, labels
drawn from the run's seed, and a run that says SYNTHETIC wherever it records its data."""
import json

import pytest
import torch

from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import model as M
from hvdtrain import session
from hvdtrain.synthetic import DEFAULT_CLASSES, POOL_BATCHES, SyntheticLoader


@pytest.fixture(scope="module")
def hvd():
    from hvdtrain import dist

    dist.init()  # one rank: no launcher
    return dist


def synthetic_cfg(task="classify", **over) -> C.Config:
    cfg, _ = C.parse_args(["--preset", "ci", f"--train.task={task}", "--data.loader=synthetic",
                           "--run.progress=False", "--run.tensorboard=False"] + [f"--{k}={v}" for k, v in over.items()])
    return cfg


def test_batches_have_the_configs_shapes_and_labels_drawn_from_the_seed():
    cfg = synthetic_cfg()
    loader = SyntheticLoader(cfg, 10, rank=0)
    batches = list(loader.epoch_batches())
    assert len(batches) == POOL_BATCHES and loader.epoch == 1
    for b in batches:
        assert [tuple(v.shape) for v in b.views] == [(8, 3, 32, 32)] and b.views[0].dtype == torch.float32
        assert b.labels.dtype == torch.int64 and 0 <= int(b.labels.min()) and int(b.labels.max()) < 10
    assert 0.8 < float(torch.cat([b.views[0] for b in batches]).std()) < 1.2  # the range of normalized images
    assert loader.last_source == "synthetic:rank0-batch3:sample7" and batches[0].keys()[0] == "sample0"
    again = SyntheticLoader(cfg, 10, rank=0)
    assert all(torch.equal(a.labels, b.labels) and torch.equal(a.views[0], b.views[0])
               for a, b in zip(batches, again.batches))
    other_rank = SyntheticLoader(cfg, 10, rank=1)
    other_seed = SyntheticLoader(synthetic_cfg(seed=5), 10, rank=0)
    labels = torch.cat([b.labels for b in batches])
    assert not torch.equal(labels, torch.cat([b.labels for b in other_rank.batches]))
    assert not torch.equal(labels, torch.cat([b.labels for b in other_seed.batches]))


def test_contrastive_gets_two_views_and_channels_last_is_kept():
    loader = SyntheticLoader(synthetic_cfg("contrastive", **{"data.channels_last": True}), None)
    b = loader.batches[0]
    assert len(b.views) == 2 and not torch.equal(b.views[0], b.views[1])
    assert all(v.is_contiguous(memory_format=torch.channels_last) for v in b.views)
    assert int(torch.cat([x.labels for x in loader.batches]).max()) < DEFAULT_CLASSES  # no classes given: 1000


def test_synthetic_refuses_data_paths_and_unknown_loaders_are_named():
    with pytest.raises(C.ConfigError, match="data.loader=synthetic reads no data, but data.train='/d'"):
        synthetic_cfg(**{"data.train": "/d"})
    with pytest.raises(C.ConfigError, match="data.loader must be one of dali, torch, synthetic"):
        C.parse_args(["--data.loader=fake"])


def test_a_synthetic_run_says_so_in_its_banner_config_checkpoint_and_summary(hvd, tmp_path, capsys):
    cfg = synthetic_cfg(**{"train.steps": 4, "run.dir": str(tmp_path / "run")})
    with session.Run(cfg) as run:
        assert run.val_loader is None and M.head_classes(run.state.model) == DEFAULT_CLASSES
        assert all(b.views[0].device == b.labels.device == hvd.device() for b in run.loader.batches)  # made there
        result = run.train()
    out = capsys.readouterr().out
    fp = "synthetic-8x1x3x32x32-c1000-seed1337"
    assert f"data    train: SYNTHETIC, no reader: 1 view(s) of 8x3x32x32 random images per micro-batch, labels " \
           f"uniform over 1000 classes (seed 1337); fingerprint {fp}" in out
    assert f"input   SYNTHETIC batches made on {hvd.device()}" in out and "done: step 4 on SYNTHETIC data," in out
    saved = json.load(open(tmp_path / "run" / "config.json"))
    assert saved["config"]["data"]["loader"] == "synthetic" and saved["data_fingerprint"] == {"train": fp}
    assert saved["data"]["train"]["synthetic"] is True and saved["data"]["train"]["view_shape"] == [8, 3, 32, 32]
    payload = ckpt.load(str(tmp_path / "run" / "ckpt-00000004.pt"))
    assert payload["provenance"]["data_fingerprint"] == {"train": fp} and payload["num_classes"] == DEFAULT_CLASSES
    assert json.load(open(tmp_path / "run" / "summary.json"))["data_fingerprint"] == {"train": fp}
    # classify from ln(1000) at the start: random labels, but the model sees the same 4 batches
    assert len(result.loop.step_losses) == 4 and result.loop.step_losses[0] == pytest.approx(6.9, abs=0.3)
