"""Shuffling across shards (data/dataset.py) with shards written class by class,
as other tools often write them: a near-uniform class mix from the first batches, a new
order each epoch, every sample once per epoch across ranks, and exact resume."""
from collections import Counter

import pytest
import torch

from hvdtrain.data.shards import open_shards
from hvdtrain.data.wds import Sample, write_split
from hvdtrain.loader import DaliLoader
from hvdtrain.pipeline import PipeSpec
from tests.conftest import jpeg

CLASSES, PER_CLASS, BATCH = 10, 64, 16


@pytest.fixture(scope="module")
def by_class(tmp_path_factory):
    """640 samples in 10 tars, tar k holding class k only."""
    d = tmp_path_factory.mktemp("byclass")
    samples = (Sample(f"c{c}s{i:03d}", jpeg(c * 1000 + i, 24), c) for c in range(CLASSES) for i in range(PER_CLASS))
    write_split(samples, str(d), [str(c) for c in range(CLASSES)], "train", PER_CLASS)
    return open_shards(str(d))


def loader(shards, rank, shard_shuffle=True, **kw):
    spec = PipeSpec(batch_size=BATCH, num_threads=1, shard_id=rank, num_shards=2, device_id=None, seed=11 + rank,
                    size=16, shuffle_buffer=64, shard_shuffle=shard_shuffle, order_seed=5, **kw)
    return DaliLoader(shards, spec, num_classes=CLASSES)


def first_batches_mix(ld, n=4) -> Counter:
    it = ld.epoch_batches()
    return Counter(label for _, b in zip(range(n), it) for label in b.labels.tolist())


def test_the_first_batches_of_an_epoch_mix_the_classes(by_class):
    for rank in (0, 1):
        mix = first_batches_mix(loader(by_class, rank))
        assert len(mix) >= 8 and max(mix.values()) / sum(mix.values()) <= 0.3, (rank, mix)
        plain = first_batches_mix(loader(by_class, rank, shard_shuffle=False))  # DALI's tar order: the bug
        assert len(plain) <= 2, (rank, plain)


def test_each_epoch_reads_every_sample_once_across_ranks_in_a_new_order(by_class):
    ranks = [loader(by_class, r) for r in (0, 1)]
    epochs = []
    for _ in range(2):
        keys = [[k for b in ld.epoch_batches() for k in b.keys()] for ld in ranks]
        assert all(len(k) == CLASSES * PER_CLASS // 2 for k in keys)  # equal steps on both ranks
        assert not set(keys[0]) & set(keys[1]) and len(set(keys[0]) | set(keys[1])) == CLASSES * PER_CLASS
        epochs.append(keys[0])
    assert epochs[0] != epochs[1] and set(epochs[0]) != set(epochs[1])  # another order, another slice
    again = [k for b in loader(by_class, 0).epoch_batches() for k in b.keys()]
    assert again == epochs[0]  # a function of (seed, epoch, rank): the same on a rebuilt loader


def test_resume_mid_epoch_after_a_rebuild_is_exact(by_class):
    a = loader(by_class, 1)
    it = a.forever()
    for _ in range(25):  # past the first epoch (20 batches): the pipeline was rebuilt once
        next(it)
    state, epoch = a.checkpoint(), a.epoch
    rest = [next(it) for _ in range(3)]
    b = DaliLoader(by_class, a.spec, num_classes=CLASSES, checkpoint=state, epoch=epoch)
    again = [x for x, _ in zip(b.forever(), range(3))]
    assert epoch == 1
    for x, y in zip(rest, again):
        assert x.keys() == y.keys() and torch.equal(x.views[0], y.views[0])


def test_resume_exactly_at_an_epoch_boundary(by_class):
    a = loader(by_class, 0)
    it = a.forever()
    for _ in range(20):  # exactly one epoch: the next batch comes from the next epoch's pipeline
        next(it)
    state, epoch = a.checkpoint(), a.epoch
    rest = [next(it) for _ in range(2)]
    b = DaliLoader(by_class, a.spec, num_classes=CLASSES, checkpoint=state, epoch=epoch)
    again = [x for x, _ in zip(b.forever(), range(2))]
    for x, y in zip(rest, again):
        assert x.keys() == y.keys() and torch.equal(x.views[0], y.views[0])


def test_contrastive_val_passes_see_the_same_views(by_class):
    """Two random views per image, drawn again each pass, would make the val loss (and
    best.pt) noise: every pass rebuilds from the fixed seed."""
    spec = PipeSpec(batch_size=BATCH, num_threads=1, shard_id=0, num_shards=1, device_id=None, seed=3, size=16,
                    views=2, random_crop_flip=True, shuffle=False)
    ld = DaliLoader(by_class, spec, num_classes=CLASSES, drop_last=False)
    first, second = (list(ld.epoch_batches())[:3] for _ in range(2))
    for x, y in zip(first, second):
        assert x.keys() == y.keys() and all(torch.equal(u, v) for u, v in zip(x.views, y.views))
    assert not torch.equal(first[0].views[0], first[0].views[1])  # random views, not copies


def test_auto_interleaves_only_shards_not_written_shuffled(by_class, tmp_path):
    from hvdtrain.data import synth
    from hvdtrain import config as C
    from hvdtrain.pipeline import spec_from_config

    synth.make(str(tmp_path), classes=3, train=12, val=0, size=16, seed=1)
    ours = open_shards(str(tmp_path / "train"))
    assert ours.shuffled is True and by_class.shuffled is False  # write_split alone claims nothing
    cfg = C.preset("ci")
    on = {m: spec_from_config(C.parse_args(["--preset", "ci", f"--data.shard_shuffle={m}"])[0], "train",
                              written_shuffled=w).shard_shuffle
          for m, w in (("auto", None), ("off", None), ("on", True))}
    assert on == {"auto": True, "off": False, "on": True}
    assert spec_from_config(cfg, "train", written_shuffled=ours.shuffled).shard_shuffle is False
    assert spec_from_config(cfg, "val", written_shuffled=None).shard_shuffle is False  # val: never
