"""DALI pipelines over WebDataset shards: reader -> decode -> crop/flip -> normalize.

Rank and size come in as arguments (`shard_id` = global rank, `num_shards` = size,
`device_id` = local rank or None with no GPU); nothing here looks them up. The
processing functions (`train_view`, `val_view`, `normalize`) take decoded images and
know nothing about readers.

Labels: `.cls` members hold ASCII decimal text (the WebDataset convention). DALI hands
them out as variable-length uint8 arrays, which cannot be batched densely, so the
pipeline pads them to LABEL_WIDTH bytes and the loader turns digits into integers on the
torch side (`loader.parse_labels`).
"""
from __future__ import annotations

from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types

from data.wds import ShardSet

LABEL_WIDTH = 16            # bytes; labels longer than this are rejected by the loader
IMAGE_EXT = "jpg;jpeg;png"  # WebDataset image members we accept (case-insensitive, below)
MEAN = [0.485 * 255, 0.456 * 255, 0.406 * 255]
STD = [0.229 * 255, 0.224 * 255, 0.225 * 255]


@dataclass
class PipeSpec:
    batch_size: int
    num_threads: int
    shard_id: int               # global rank
    num_shards: int             # world size
    device_id: int | None       # local rank's GPU, None = CPU backend
    seed: int
    size: int                   # output side, pixels
    min_scale: float = 0.25     # random-resized-crop area lower bound
    views: int = 1              # 1 = classification, 2 = two-view contrastive
    train: bool = True          # False: no shuffle, resize + centre crop, no flip
    decode: str = "cpu"         # cpu | mixed (nvJPEG; needs device_id)
    shuffle_buffer: int = 1024
    prefetch: int = 2
    augment: bool = True        # False = decode-only ceiling (bench): decode + fixed resize
    normalize: str = "dali"     # dali: float CHW out of DALI | kernel: uint8 HWC + flip flags out,
                                # normalized on the target device by kernels.normalize (4x fewer bytes)
    shuffle: bool | None = None  # reader random_shuffle; None = train


def train_view(images, size: int, min_scale: float, device: str):
    """One random view: a random-resized crop (uint8 HWC) and its coin-flip flag."""
    crop = fn.random_resized_crop(images, size=(size, size), random_area=(min_scale, 1.0),
                                  device=device)
    return crop, fn.random.coin_flip()


def val_view(images, size: int, device: str):
    """Deterministic view: shorter side to size*8/7, centre crop size x size (uint8 HWC)."""
    resized = fn.resize(images, resize_shorter=int(round(size * 8 / 7)), device=device)
    return fn.crop(resized, crop=(size, size), device=device)


def normalize(images, mirror):
    """Cast, mirror, (x - mean) / std, HWC -> CHW float: DALI's fused op."""
    return fn.crop_mirror_normalize(images, mirror=mirror, dtype=types.FLOAT, output_layout="CHW",
                                    mean=MEAN, std=STD)


def finish(views: list, flips: list | None, spec: PipeSpec) -> list:
    """DALI-normalized views, or (normalize=kernel) uint8 views followed by their flip flags.
    `flips=None`: deterministic views, never mirrored (and no flag outputs)."""
    if spec.normalize == "kernel":
        return views + (flips or [])
    return [normalize(v, mirror=f) for v, f in zip(views, flips or [0] * len(views))]


@pipeline_def
def _wds_pipeline(shards: ShardSet, spec: PipeSpec):
    images, labels = fn.readers.webdataset(
        paths=shards.paths, index_paths=shards.index_paths, ext=[IMAGE_EXT, "cls"],
        case_sensitive_extensions=False, missing_component_behavior="error",
        random_shuffle=spec.train if spec.shuffle is None else spec.shuffle, initial_fill=spec.shuffle_buffer,
        shard_id=spec.shard_id, num_shards=spec.num_shards,
        pad_last_batch=True,  # every rank gets the same number of iterations per epoch
        name="Reader")
    source = fn.pad(fn.get_property(images, key="source_info"), fill_value=0)  # "tar:offset:member"
    mixed = spec.decode == "mixed"
    device = "gpu" if mixed else "cpu"
    decoder_device = "mixed" if mixed else "cpu"
    if not spec.augment:
        decoded = fn.decoders.image(images, device=decoder_device, output_type=types.RGB)
        outs = finish([fn.resize(decoded, size=(spec.size, spec.size), device=device)], None, spec)
    elif spec.train and spec.views == 1:
        # decode only the crop window: fewer pixels through the IDCT, faster on CPU too
        crop = fn.decoders.image_random_crop(images, device=decoder_device, output_type=types.RGB,
                                             random_area=(spec.min_scale, 1.0))
        outs = finish([fn.resize(crop, size=(spec.size, spec.size), device=device)],
                      [fn.random.coin_flip()], spec)
    else:
        decoded = fn.decoders.image(images, device=decoder_device, output_type=types.RGB)
        if spec.train:
            pairs = [train_view(decoded, spec.size, spec.min_scale, device) for _ in range(spec.views)]
            outs = finish([v for v, _ in pairs], [f for _, f in pairs], spec)
        else:
            outs = finish([val_view(decoded, spec.size, device)], None, spec)
    labels = fn.pad(labels, fill_value=0, shape=[LABEL_WIDTH])
    return (*outs, labels, source)


def build(shards: ShardSet, spec: PipeSpec, checkpoint: bytes | None = None):
    """Build the DALI pipeline; outputs are `view0[, view1], labels, source`.

    Checkpointing is always on (DALI: no cost): `checkpoint` restores the reader position
    and every random operator's state from a saved `DaliLoader.checkpoint()`."""
    if spec.decode == "mixed" and spec.device_id is None:
        raise ValueError("decode=mixed needs a GPU (device_id); use decode=cpu")
    pipe = _wds_pipeline(shards, spec, batch_size=spec.batch_size, num_threads=spec.num_threads,
                         device_id=spec.device_id, seed=spec.seed, prefetch_queue_depth=spec.prefetch,
                         enable_checkpointing=True, checkpoint=checkpoint)
    pipe.build()
    return pipe


def output_names(spec: PipeSpec) -> list[str]:
    n = spec.views if (spec.train and spec.augment) else 1
    flips = [f"flip{i}" for i in range(n)] if spec.normalize == "kernel" and spec.train and spec.augment else []
    return [f"view{i}" for i in range(n)] + flips + ["labels", "source"]
