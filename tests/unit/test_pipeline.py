"""The DALI pipeline and loader on real shards, in one process (CPU backend)."""
import math

import pytest
import torch

from hvdtrain.data.shards import open_shards
from hvdtrain.data.wds import LABEL_WIDTH
from hvdtrain import config as C
from hvdtrain import model as M
from hvdtrain import task as TK
from hvdtrain.loader import DaliLoader, DataError, parse_labels
from hvdtrain.pipeline import PipeSpec
from tests.conftest import unique_shards


def spec(**kw):
    base = dict(batch_size=8, num_threads=1, shard_id=0, num_shards=1, device_id=None, seed=3, size=32,
                shuffle_buffer=16)
    base.update(kw)
    return PipeSpec(**base)


def val_spec(**kw):
    """The val pass's spec: resize + centre crop, no shuffle (read with drop_last=False)."""
    return spec(random_crop_flip=False, shuffle=False, **kw)


def test_labels_and_keys_come_out_right(tmp_path):
    unique_shards(str(tmp_path), n=40, shard_size=15, classes=7)
    loader = DaliLoader(open_shards(str(tmp_path)), val_spec(), num_classes=7, drop_last=False)
    seen = {}
    for b in loader.epoch_batches():
        assert b.views[0].shape == (b.labels.shape[0], 3, 32, 32) and b.views[0].dtype == torch.float32
        for key, label in zip(b.keys(), b.labels.tolist()):
            seen[key] = label
    assert len(seen) == 40 and loader.epoch == 1
    assert all(label == int(key[1:8]) % 7 for key, label in seen.items())  # key u0000012.jpg -> 12 % 7


def test_two_views_differ_and_epochs_wrap(tmp_path):
    unique_shards(str(tmp_path), n=32, shard_size=16)
    loader = DaliLoader(open_shards(str(tmp_path)), spec(views=2))
    assert len(loader) == 4
    batches = loader.forever()
    b = next(batches)
    assert len(b.views) == 2 and not torch.equal(b.views[0], b.views[1])
    for _ in range(8):
        next(batches)
    assert loader.epoch == 2


def test_parse_labels_ascii_digits_and_errors():
    def pad(texts):
        out = torch.zeros(len(texts), LABEL_WIDTH, dtype=torch.uint8)
        for i, t in enumerate(texts):
            out[i, :len(t)] = torch.tensor(list(t))
        return out
    assert parse_labels(pad([b"0", b"7", b"199", b"42\n", b" 5"])).tolist() == [0, 7, 199, 42, 5]
    with pytest.raises(DataError, match=r"batch row 1: label b'cat'"):
        parse_labels(pad([b"1", b"cat"]))
    with pytest.raises(DataError, match="not a decimal class index"):
        parse_labels(pad([b""]))


def test_out_of_range_label_names_the_sample(tmp_path):
    unique_shards(str(tmp_path), n=16, shard_size=16, classes=10)
    loader = DaliLoader(open_shards(str(tmp_path)), val_spec(), num_classes=5, drop_last=False)
    with pytest.raises(DataError, match=r"train-000000.tar:\d+:u\d{7}.jpg: label \d out of range \[0, 5\)"):
        next(loader.epoch_batches())


def test_initial_contrastive_loss_is_ln_batch(synth_data):
    """Golden number: an untrained encoder cannot tell images apart, so InfoNCE starts
    at ln(B) (a sanity run at batch 16 starts at 2.7692, mean of its first 10 steps, against
ln 16 = 2.7726)."""
    cfg = C.preset("sanity")
    torch.manual_seed(cfg.seed)
    enc = M.build(cfg.model)
    loader = DaliLoader(open_shards(synth_data + "/train"), spec(batch_size=16, views=2, size=64))
    with torch.no_grad():
        losses = [TK.info_nce(enc(b.views[0]), enc(b.views[1]), cfg.model.temperature).item()
                  for b, _ in zip(loader.forever(), range(4))]
    assert abs(sum(losses) / len(losses) - math.log(16)) < 0.1, losses


def test_kernel_normalize_path_matches_dalis_normalize(tmp_path):
    """uint8 out of DALI + kernels.normalize on the torch side == DALI's crop_mirror_normalize."""
    unique_shards(str(tmp_path), n=24, shard_size=24)
    shards = open_shards(str(tmp_path))
    a = next(DaliLoader(shards, val_spec(normalize="dali"), drop_last=False).epoch_batches())
    b = next(DaliLoader(shards, val_spec(normalize="kernel"), drop_last=False).epoch_batches())
    assert a.keys() == b.keys() and b.views[0].dtype == torch.float32
    assert torch.allclose(a.views[0], b.views[0], atol=1e-5)


def test_kernel_normalize_train_views_and_channels_last(tmp_path):
    unique_shards(str(tmp_path), n=16, shard_size=16)
    loader = DaliLoader(open_shards(str(tmp_path)), spec(views=2, normalize="kernel"), channels_last=True)
    assert loader.names == ["view0", "view1", "flip0", "flip1", "labels", "source"]
    b = next(loader.epoch_batches())
    for v in b.views:
        assert v.shape == (8, 3, 32, 32) and v.is_contiguous(memory_format=torch.channels_last)
        assert -3 < float(v.mean()) < 3 and float(v.std()) > 0.1  # normalized, not raw pixels


def test_exif_orientation_is_applied_like_a_viewer_shows_it():
    """The documented choice (docs/reliability.md): DALI's decoder turns an EXIF-rotated
    JPEG upright; the PIL baseline does the same, so both loaders see the same picture."""
    import io

    import numpy as np
    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image, ImageOps

    im = Image.fromarray(np.zeros((20, 60, 3), np.uint8))
    exif = im.getexif()
    exif[0x0112] = 6  # stored 60 wide x 20 high, shown rotated: 20 wide x 60 high
    buf = io.BytesIO()
    im.save(buf, format="JPEG", exif=exif.tobytes())
    data = np.frombuffer(buf.getvalue(), np.uint8)

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode():
        return fn.decoders.image(fn.external_source(lambda: [data], batch=True), output_type=types.RGB)

    pipe = decode()
    pipe.build()
    assert pipe.run()[0].as_array().shape == (1, 60, 20, 3)
    with Image.open(io.BytesIO(buf.getvalue())) as shown:
        assert ImageOps.exif_transpose(shown).size == (20, 60)  # (width, height), as DALI


# ---------------------------------------------------------------- the torch loader behind the same protocol
def test_torch_loader_reads_every_sample_once_with_its_label(tmp_path):
    from hvdtrain.torch_loader import TorchLoader

    unique_shards(str(tmp_path), n=40, shard_size=15, classes=7)
    loader = TorchLoader(open_shards(str(tmp_path)), val_spec(), num_classes=7, drop_last=False, workers=0)
    seen = {}
    for b in loader.epoch_batches():
        assert b.views[0].shape == (b.labels.shape[0], 3, 32, 32) and b.views[0].dtype == torch.float32
        seen.update(zip(b.keys(), b.labels.tolist()))
    assert len(seen) == 40 and loader.epoch == 1 and len(loader) == 5
    assert all(label == int(key[1:8]) % 7 for key, label in seen.items())


def test_torch_loader_shuffles_per_epoch_and_resumes_exactly(tmp_path):
    from hvdtrain.torch_loader import TorchLoader

    unique_shards(str(tmp_path), n=48, shard_size=16)
    shards = open_shards(str(tmp_path))
    a = TorchLoader(shards, spec(), workers=2)
    it = a.forever()
    first = [next(it) for _ in range(6)]  # one epoch (6 batches of 8) ...
    second = [next(it) for _ in range(2)]  # ... and two batches of the next
    ep0, ep1 = [k for b in first for k in b.keys()], [k for b in second for k in b.keys()]
    assert len(set(ep0)) == 48 and a.epoch == 1 and ep0[:16] != ep1  # every sample once, a new order
    state = a.checkpoint()
    rest = [next(it) for _ in range(3)]
    b = TorchLoader(shards, spec(), workers=0, checkpoint=state)  # worker count does not change the crops
    again = [x for x, _ in zip(b.forever(), range(3))]
    for x, y in zip(rest, again):
        assert x.keys() == y.keys() and torch.equal(x.views[0], y.views[0])


def test_cpu_decode_hands_over_dalis_own_memory(tmp_path):
    """The fact hvdtrain.batch.to_device is built on: the pipelines run DALI's dynamic
    executor, with which DALIGenericIterator hands out views of DALI's output buffers
    (torch.from_dlpack), not copies torch allocated; so the crops go to a GPU through a
    pinned buffer torch owns (the copy itself is checked in tests/gpu/test_device_path.py)."""
    from hvdtrain.batch import to_device

    unique_shards(str(tmp_path), n=16, shard_size=16)
    loader = DaliLoader(open_shards(str(tmp_path)), spec(normalize="kernel"))
    assert loader.pipe.exec_dynamic is True
    raw = next(loader._part["it"])[0]["view0"]
    assert raw.dtype == torch.uint8 and to_device(raw, torch.device("cpu")) is raw  # no GPU: nothing to stage


def test_torch_loader_reads_unlabeled_samples_as_dali_does(tmp_path, monkeypatch):
    """img2dataset-style shards (no .cls) with a labelled sample in every fourth: with
    labels optional (contrastive) both loaders give -1 for the unlabeled and the label for
    the others, sample by sample; without, the torch loader refuses naming the sample."""
    import webdataset as wds

    from hvdtrain.torch_loader import TorchLoader
    from tests.conftest import jpeg

    monkeypatch.setenv("HVDTRAIN_CACHE", str(tmp_path / "cache"))
    (tmp_path / "d").mkdir()
    with wds.TarWriter(str(tmp_path / "d" / "00000.tar")) as sink:
        for i in range(20):
            sink.write({"__key__": f"{i:09d}", "jpg": jpeg(i), "txt": f"caption {i}",
                        **({"cls": str(i % 3)} if i % 4 == 0 else {})})
    shards = open_shards(str(tmp_path / "d"))
    assert shards.unlabeled == 15
    got = {}
    for name, cls in (("dali", DaliLoader), ("torch", TorchLoader)):
        kw = {"workers": 0} if cls is TorchLoader else {}
        loader = cls(shards, val_spec(labels_optional=True), drop_last=False, **kw)
        got[name] = {k: v for b in loader.epoch_batches() for k, v in zip(b.keys(), b.labels.tolist())}
    assert got["torch"] == got["dali"] and len(got["dali"]) == 20
    assert sorted(v for v in got["dali"].values()) == [-1] * 15 + [0, 0, 1, 1, 2]
    with pytest.raises(DataError, match=r"00000\.tar: 000000001: sample has no \.cls member"):
        TorchLoader(shards, val_spec(), drop_last=False, workers=0)
