"""DALI pipelines over WebDataset shards: reader -> decode -> crop/flip -> normalize.

`spec_from_config` is the one place where a run's config becomes a `PipeSpec`; the
training run, the val pass, the sanity and `bench.loader` all ask it. Rank and size come
in as arguments (`shard_id` = global rank, `num_shards` = size, `device_id` = local rank
or None with no GPU); nothing here looks them up. The processing functions
(`train_view`, `val_view`, `normalize`) take decoded images and know nothing about
readers.

The reader reads one rank's view (`data.dataset.rank_view`: index files listing only that
rank's samples) as its only shard. Images: every extension of `data.wds.IMAGE_EXTS`
(what DALI 2.4's decoder reads), any letter case.

Labels: `.cls` members hold ASCII decimal text (the WebDataset convention). DALI hands
them out as variable-length uint8 arrays, which cannot be batched densely, so the
pipeline pads them to `data.wds.LABEL_WIDTH` bytes and the loader turns digits into
integers on the torch side (`loader.parse_labels`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from nvidia.dali import fn, pipeline_def, types

from hvdtrain.data.shards import ShardSet
from hvdtrain.data.wds import IMAGE_EXTS, LABEL_WIDTH
from hvdtrain import task as TK
from hvdtrain.config import derive_seed

DEFAULT_WINDOW_SHARDS = 8  # bucket data through the node cache: shards per reader window
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
    random_crop_flip: bool = True  # random-resized crop + flip; False: resize + centre crop, never flipped
    shuffle: bool = True        # the reader's random_shuffle (within the initial_fill buffer)
    decode: str = "cpu"         # cpu | mixed (nvJPEG + the hardware JPEG decoder; needs device_id)
    hw_decoder_load: float = 0.99  # mixed: share of images sent to the hardware decoder
    shuffle_buffer: int = 1024
    prefetch: int = 2
    normalize: str = "dali"     # dali: float CHW out of DALI | kernel: uint8 HWC + flip flags out,
                                # normalized on the target device by kernels.normalize (4x fewer bytes)
    antialias: bool = False     # antialiased resize (downscaling)
    fast_idct: bool = True      # libjpeg-turbo's fast IDCT (CPU decoding)
    ceiling: bool = False       # bench only: the decoder call alone, its output dropped inside the pipeline
    order_seed: int = 0         # identical on every rank: the per-epoch order of chunks / samples
    shard_shuffle: bool = False  # the loader reads each epoch's interleaved chunks (data/dataset.py)
    interleave_chunk: int = 0   # samples per chunk; 0 = automatic
    labels_optional: bool = False  # unlabeled shards (contrastive): a missing .cls reads as empty (label -1)
    window_shards: int = 0      # > 0: the loader reads the epoch in windows of about this many shards'
                                # samples, one pipeline each (hvdtrain/reading.py); 0 = one part per epoch


def spec_from_config(cfg, split: str = "train", *, rank: int = 0, size: int = 1, device_id: int | None = None,
                     threads: int = 1, written_shuffled: bool | None = None,
                     labels_optional: bool = False, remote: bool = False) -> PipeSpec:
    """The pipeline a run's config asks for, for `split` ("train" or "val") on one rank.

    Train: the task's views, random-resized crop + flip unless `data.augment=False`,
    shuffled unless `data.shuffle=False`. Val: never shuffled; classify gets the
    deterministic resize + centre crop, contrastive its two random views (from a seed of
    their own, rebuilt every pass so every pass sees the same views). `written_shuffled`:
    the shards' `_info.json` says their samples were written in random order
    (`data.shard_shuffle=auto` then leaves the tars in DALI's order). `remote`: bucket data,
    read in windows of `data.window_shards` (0: DEFAULT_WINDOW_SHARDS through the cache)."""
    d, task = cfg.data, TK.get(cfg.train.task)
    decode = d.decode if d.decode != "auto" else ("mixed" if device_id is not None else "cpu")
    # kernel only where it saves PCIe bytes: CPU decode feeding a GPU; with no GPU it would
    # move DALI's (threaded) normalize onto the training thread
    normalize = d.normalize if d.normalize != "auto" else (
        "kernel" if decode == "cpu" and device_id is not None else "dali")
    train = split == "train"
    views = task.views if train else task.val_views
    return PipeSpec(batch_size=cfg.train.batch_size if train else (d.val_batch_size or cfg.train.batch_size),
                    num_threads=threads, shard_id=rank, num_shards=size, device_id=device_id,
                    seed=derive_seed(cfg.seed, f"dali-{split}", rank), size=d.size, min_scale=d.min_scale,
                    views=views, random_crop_flip=d.augment if train else views == 2,
                    shuffle=d.shuffle if train else False, decode=decode, hw_decoder_load=d.hw_decoder_load,
                    shuffle_buffer=d.shuffle_buffer, prefetch=d.prefetch, normalize=normalize,
                    antialias=d.antialias, fast_idct=d.fast_idct, order_seed=derive_seed(cfg.seed, "order", 0),
                    shard_shuffle=train and d.shuffle and (d.shard_shuffle == "on" or (
                        d.shard_shuffle == "auto" and not written_shuffled)),
                    interleave_chunk=d.interleave_chunk, labels_optional=labels_optional,
                    window_shards=d.window_shards or (DEFAULT_WINDOW_SHARDS if remote and d.remote == "cache" else 0))


def ceiling_of(spec: PipeSpec) -> PipeSpec:
    """The bench's ceiling for a loader's spec: the same reader and decoder call (same
    seed, so the same random crops), with nothing after the decoder."""
    return dataclasses.replace(spec, ceiling=True)


def train_view(images, size: int, min_scale: float, device: str, antialias: bool = False):
    """One random view: a random-resized crop (uint8 HWC) and its coin-flip flag."""
    crop = fn.random_resized_crop(images, size=(size, size), random_area=(min_scale, 1.0),
                                  antialias=antialias, device=device)
    return crop, fn.random.coin_flip()


def val_view(images, size: int, device: str, antialias: bool = False):
    """Deterministic view: shorter side to size*8/7, centre crop size x size (uint8 HWC)."""
    resized = fn.resize(images, resize_shorter=int(round(size * 8 / 7)), antialias=antialias, device=device)
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


def decode(images, spec: PipeSpec):
    """The decoder call: a region-of-interest decode of one random crop window for
    single-view training (fewer pixels through the IDCT), else a full decode."""
    mixed = spec.decode == "mixed"
    kw = {"device": "mixed" if mixed else "cpu", "output_type": types.RGB, "use_fast_idct": spec.fast_idct}
    if mixed:
        kw["hw_decoder_load"] = spec.hw_decoder_load
    if spec.random_crop_flip and spec.views == 1:
        return fn.decoders.image_random_crop(images, random_area=(spec.min_scale, 1.0), **kw)
    return fn.decoders.image(images, **kw)


@pipeline_def
def _wds_pipeline(shards: ShardSet, spec: PipeSpec):
    images, labels = fn.readers.webdataset(
        paths=shards.paths, index_paths=shards.index_paths, ext=[";".join(IMAGE_EXTS), "cls"],
        case_sensitive_extensions=False,
        missing_component_behavior="empty" if spec.labels_optional else "error",
        random_shuffle=spec.shuffle, initial_fill=spec.shuffle_buffer,
        shard_id=spec.shard_id, num_shards=spec.num_shards,
        pad_last_batch=True,  # every rank gets the same number of iterations per epoch
        name="Reader")
    decoded = decode(images, spec)
    device = "gpu" if spec.decode == "mixed" else "cpu"
    if spec.ceiling:
        # one pixel per image leaves the pipeline: the decode is kept, its output is dropped
        return fn.crop(decoded, crop=(1, 1), device=device)
    source = fn.pad(fn.get_property(images, key="source_info"), fill_value=0)  # "tar:offset:member"
    if spec.random_crop_flip and spec.views == 1:
        outs = finish([fn.resize(decoded, size=(spec.size, spec.size), antialias=spec.antialias, device=device)],
                      [fn.random.coin_flip()], spec)
    elif spec.random_crop_flip:
        pairs = [train_view(decoded, spec.size, spec.min_scale, device, spec.antialias) for _ in range(spec.views)]
        outs = finish([v for v, _ in pairs], [f for _, f in pairs], spec)
    else:
        outs = finish([val_view(decoded, spec.size, device, spec.antialias)], None, spec)
    labels = fn.pad(labels, fill_value=0, shape=[LABEL_WIDTH])
    return (*outs, labels, source)


def build(shards: ShardSet, spec: PipeSpec, checkpoint: bytes | None = None):
    """Build the DALI pipeline; outputs are `view0[, view1][, flip0, flip1], labels, source`
    (`output_names`), or the ceiling's one dropped pixel per image.

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
    if spec.ceiling:
        return ["pixel"]
    n = spec.views if spec.random_crop_flip else 1
    flips = [f"flip{i}" for i in range(n)] if spec.normalize == "kernel" and spec.random_crop_flip else []
    return [f"view{i}" for i in range(n)] + flips + ["labels", "source"]
