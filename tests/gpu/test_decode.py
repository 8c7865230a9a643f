"""Mixed (nvJPEG + the hardware JPEG decoder) against CPU (libjpeg-turbo) decode, on the
same shards with shuffling off.

Tolerance: with the accurate IDCT both decoders follow the JPEG IDCT accuracy rules and
differ by rounding, a level or two; the shards are 4:4:4 (no chroma upsampling, which
decoders do differently), and the val path's resize is the same algorithm on both
backends. So, over every pixel of a pass: mean |difference| <= 2 levels (of 255) and 99 %
of values within 8 levels. With the training default `data.fast_idct=True` (libjpeg-turbo's
fast integer IDCT on the CPU side) allow mean 3 and p99 12: on these shards the fast IDCT
alone moves the CPU's pixels by mean 1.06, p99 4 levels (measured on the CPU, 2026-11-24,
DALI 2.4.0). A channel swap, a shifted crop, another resize or another image fails either
by tens of levels.
"""
import pytest
import torch

from hvdtrain import pipeline
from hvdtrain.loader import DaliLoader
from hvdtrain.pipeline import STD
from tests.gpu.common import GPU, small_cfg

pytestmark = GPU
TOLERANCE = {False: (2.0, 8.0), True: (3.0, 12.0)}  # fast_idct -> (mean, p99) levels


def loader(shards, split: str, decode: str, hw_load: float = 0.99, shuffle: bool = False,
           fast_idct: bool = True) -> DaliLoader:
    cfg = small_cfg()
    cfg.data.size, cfg.data.decode, cfg.data.normalize = 96, decode, "dali"  # the same normalize on both
    cfg.data.hw_decoder_load, cfg.data.shuffle, cfg.data.val_batch_size = hw_load, shuffle, 16
    cfg.data.fast_idct = fast_idct
    gpu = decode == "mixed"
    spec = pipeline.spec_from_config(cfg, split, device_id=0 if gpu else None, threads=2)
    return DaliLoader(shards, spec, num_classes=shards.num_classes,
                      device=torch.device("cuda", 0) if gpu else None, drop_last=split == "train")


def one_pass(ld: DaliLoader):
    """(keys, labels, views on the GPU as normalized float) of one epoch."""
    keys, labels, views = [], [], []
    for b in ld.epoch_batches():
        keys += b.keys()
        labels += b.labels.tolist()
        views.append(b.views[0].cuda())
    return keys, labels, torch.cat(views)


def levels(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| in 0..255 pixel levels, from DALI-normalized [N, 3, H, W] views."""
    std = torch.tensor(STD, device=a.device).view(1, 3, 1, 1)
    return ((a - b).abs() * std).flatten()


@pytest.mark.parametrize("hw_load,fast_idct", [(0.0, False), (0.99, False), (0.99, True)],
                         ids=["cuda-decoder", "hardware-decoder", "hardware-decoder-fast-idct"])
def test_mixed_decode_matches_cpu_decode_on_the_val_path(photo_shards, hw_load, fast_idct):
    cpu_keys, cpu_labels, cpu_views = one_pass(loader(photo_shards, "val", "cpu", fast_idct=fast_idct))
    gpu_keys, gpu_labels, gpu_views = one_pass(loader(photo_shards, "val", "mixed", hw_load, fast_idct=fast_idct))
    assert len(cpu_keys) == photo_shards.total == 48
    assert gpu_keys == cpu_keys and gpu_labels == cpu_labels  # same samples, same order
    assert gpu_views.shape == cpu_views.shape == (48, 3, 96, 96)
    d = levels(gpu_views, cpu_views)
    mean, p99, worst = float(d.mean()), float(d.quantile(0.99)), float(d.max())
    tol_mean, tol_p99 = TOLERANCE[fast_idct]
    assert mean <= tol_mean and p99 <= tol_p99, (
        f"mixed vs cpu decode: mean {mean:.2f}, p99 {p99:.2f}, max {worst:.1f} levels "
        f"(tolerance mean {tol_mean}, p99 {tol_p99})")


def test_the_mixed_val_path_is_deterministic(photo_shards):
    a = one_pass(loader(photo_shards, "val", "mixed"))
    b = one_pass(loader(photo_shards, "val", "mixed"))
    assert a[0] == b[0] and a[1] == b[1]
    assert torch.equal(a[2], b[2]), "two val passes over the same shards decoded different pixels"


def test_mixed_train_path_with_shuffling_off_keeps_labels_order_and_shapes(photo_shards):
    """Random crops differ between backends; the samples, their order and the shapes must not."""
    cpu, gpu = loader(photo_shards, "train", "cpu"), loader(photo_shards, "train", "mixed")
    cb, gb = list(cpu.epoch_batches()), list(gpu.epoch_batches())
    assert len(gb) == len(cb) == 6 and cpu.epoch == gpu.epoch == 1
    for bc, bg in zip(cb, gb):
        assert bg.keys() == bc.keys() and torch.equal(bg.labels, bc.labels)
        assert bg.views[0].shape == bc.views[0].shape == (8, 3, 96, 96)
        assert bg.views[0].is_cuda and bg.views[0].dtype == torch.float32
