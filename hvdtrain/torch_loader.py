"""The torch baseline behind the same loop: DataLoader workers + PIL over the same shards.

    python -m hvdtrain.train ... --data.loader=torch     # train with it
    python -m bench.loader --loader torch                # set it beside DALI

It reads samples at the offsets the shards' DALI indexes give (`.idx`: no tar walk), and
shards them as DALI does: rank r takes the r-th contiguous slice of the samples, padded
to the same length on every rank (the last sample repeated, like `pad_last_batch`), so
every rank takes the same number of training steps. With shuffling on, each epoch reads
a global permutation drawn from (seed, epoch): identical on every rank, a different
order each epoch, every sample once per epoch across ranks. Each sample's random crop
and flip come from its own seed (rank seed, epoch, position), so the result does not
depend on the worker count and a checkpoint (epoch + batches consumed) resumes exactly.
Outputs are uint8 crops + flip flags, normalized on the training device by
kernels.normalize (spec.normalize == "kernel", for a GPU), or normalized float CHW made in
the workers (otherwise: on a CPU-only machine the training thread stays free, as with DALI).
"""
from __future__ import annotations

import io
import json
import math
import os
import random

import numpy as np
import torch

from hvdtrain.data.dataset import rank_range
from hvdtrain.data.shards import ShardSet
from hvdtrain.data.tarindex import read_index, split_name
from hvdtrain.data.wds import IMAGE_EXTS
from hvdtrain.batch import Batch, DataError, check_label_range, decode_source, to_model_input
from hvdtrain.pipeline import MEAN, STD, PipeSpec

KIND = "torch-loader-v1"


def random_resized_crop_box(w: int, h: int, min_scale: float, rng: random.Random) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop parameters (scale (min_scale, 1), ratio 3/4..4/3)."""
    area = w * h
    for _ in range(10):
        target = area * rng.uniform(min_scale, 1.0)
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(target * ratio))), int(round(math.sqrt(target / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            return x, y, x + cw, y + ch
    s = min(w, h)
    return (w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s


def index_items(shards: ShardSet, labels_optional: bool = False) -> list[tuple[str, int, int, int, int, str]]:
    """(tar, image offset, image size, label offset, label size, image member) per sample,
    in DALI's global order (tars in the order given, samples in index order). With
    `labels_optional` (unlabeled shards, contrastive: DALI's `missing_component_behavior=
    "empty"`) a sample without `.cls` gets label offset -1, read as label -1."""
    items = []
    for tar, idx in zip(shards.paths, shards.index_paths):
        for comps in read_index(idx):
            by_ext = {split_name(name)[1].lower(): (off, size, name) for _, off, size, name in comps}
            img = next((by_ext[e] for e in IMAGE_EXTS if e in by_ext), None)  # the reader's one list
            cls = by_ext.get("cls")
            if img is None or (cls is None and not labels_optional):
                key = split_name(comps[0][3])[0] if comps else "?"
                what = "no image" if img is None else "no .cls member"
                raise DataError(f"{tar}: {key}: sample has {what} (check the shards with "
                                f"`python -m data.verify {shards.spec}`)")
            cls = cls or (-1, 0, "")  # offset -1: no .cls member
            items.append((tar, img[0], img[1], cls[0], cls[1], img[2]))
    return items


class _Samples(torch.utils.data.Dataset):
    """Map-style: index (item number, per-sample seed) -> (uint8 views, flips, label, source)."""

    def __init__(self, items, spec: PipeSpec, local: dict[str, str] | None = None):
        self.items, self.spec, self.local = items, spec, local or {}

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key):
        from PIL import Image, ImageOps

        i, seed = key
        tar, off, size, cls_off, cls_size, name = self.items[i] if isinstance(i, int) else i
        source = f"{tar}:{off}:{name}"
        with open(self.local.get(tar, tar), "rb") as f:  # bucket data: its copy in the node cache
            data = os.pread(f.fileno(), size, off)
            label = os.pread(f.fileno(), cls_size, cls_off) if cls_off >= 0 else None
        try:
            with Image.open(io.BytesIO(data)) as im:
                im = ImageOps.exif_transpose(im).convert("RGB")  # as DALI's decoder: EXIF applied
        except Exception as e:  # noqa: BLE001 - every PIL failure means "cannot decode this sample"
            raise DataError(f"{source}: undecodable image ({e.__class__.__name__}: {e})") from None
        if label is None:
            value = -1  # no .cls (labels optional): -1, as DALI's path
        elif label.strip().isdigit():
            value = int(label.strip())
        else:
            raise DataError(f"{source}: label {label[:20]!r} is not a decimal class index")
        rng, s = random.Random(seed), self.spec.size
        views, flips = [], []
        for _ in range(self.spec.views if self.spec.random_crop_flip else 1):
            if self.spec.random_crop_flip:
                box = random_resized_crop_box(im.width, im.height, self.spec.min_scale, rng)
                views.append(np.array(im.resize((s, s), Image.BILINEAR, box=box)))
                flips.append(rng.random() < 0.5)
            else:  # DALI's val_view: shorter side to size*8/7, centre crop
                short = int(round(s * 8 / 7))
                k = short / min(im.width, im.height)
                r = im.resize((max(s, round(im.width * k)), max(s, round(im.height * k))), Image.BILINEAR)
                x, y = (r.width - s) // 2, (r.height - s) // 2
                views.append(np.array(r.crop((x, y, x + s, y + s))))
                flips.append(False)
        if self.spec.normalize != "kernel":  # float CHW made here, in the worker
            views = [_normalized(v, f) for v, f in zip(views, flips)]
        return ([torch.from_numpy(np.ascontiguousarray(v)) for v in views], torch.tensor(flips),
                value, source.encode())


_MEAN_NP, _STD_NP = np.array(MEAN, np.float32), np.array(STD, np.float32)


def _normalized(v: np.ndarray, flip: bool) -> np.ndarray:
    """uint8 HWC -> (x - mean) / std as float32 CHW, mirrored if `flip` (kernels.normalize_ref's maths)."""
    x = (v.astype(np.float32) - _MEAN_NP) / _STD_NP
    return (x[:, ::-1] if flip else x).transpose(2, 0, 1)


def _collate(samples):
    views = [torch.stack([s[0][k] for s in samples]) for k in range(len(samples[0][0]))]
    flips = torch.stack([s[1] for s in samples])
    labels = torch.tensor([s[2] for s in samples], dtype=torch.int64)
    width = max(len(s[3]) for s in samples)
    sources = torch.zeros(len(samples), width, dtype=torch.uint8)
    for i, s in enumerate(samples):
        sources[i, :len(s[3])] = torch.frombuffer(bytearray(s[3]), dtype=torch.uint8)
    return views, flips, labels, sources


class _Plan:
    """The DataLoader's batch sampler: this epoch's batches, set before each pass, so one
    DataLoader (and its persistent workers) serves every epoch."""

    def __init__(self):
        self.batches: list[list[tuple[int, int]]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


class TorchLoader:
    """DataLoader + PIL, sharded and padded like DALI; see the module docstring."""

    def __init__(self, shards: ShardSet, spec: PipeSpec, num_classes: int | None = None,
                 device: torch.device | None = None, dtype: torch.dtype = torch.float32,
                 channels_last: bool = False, drop_last: bool = True, checkpoint: bytes | None = None,
                 epoch: int = 0, workers: int | None = None):
        self.shards, self.spec, self.num_classes = shards, spec, num_classes
        self.device, self.dtype, self.channels_last, self.drop_last = device or torch.device("cpu"), dtype, \
            channels_last, drop_last
        self.items = index_items(shards, spec.labels_optional)
        self.per_rank = -(-len(self.items) // spec.num_shards)  # ceil: the padded slice length
        self.epoch, self._batches_done = epoch, 0  # position in the epoch: batches handed out
        self.last_source = "(no batch read yet)"
        if checkpoint is not None:
            state = json.loads(checkpoint)
            if state.get("kind") != KIND:
                raise ValueError(f"not a torch-loader checkpoint: {str(state)[:80]}")
            self.epoch, self._batches_done = state["epoch"], state["batches"]
        self.workers = spec.num_threads if workers is None else workers
        self._plan = _Plan()
        self.reading = None
        local = {}
        if spec.window_shards or shards.is_remote:
            from hvdtrain.reading import Reading

            if shards.is_remote and (shards.remote is None or shards.remote.mode != "cache" or not spec.window_shards):
                raise DataError(f"{shards.spec}: --data.loader=torch reads bucket data through the node cache, in "
                                f"windows (--data.remote=cache; --data.remote=direct is DALI's own reader)")
            self.reading = Reading(shards, spec, drop_last, "train" if drop_last else "val")
            if self.reading.cache is not None:
                local = {u: self.reading.cache.path_of(o) for u, o in shards.objects.items()}
        self._loader = torch.utils.data.DataLoader(
            _Samples(self.items, spec, local), batch_sampler=self._plan, num_workers=self.workers,
            collate_fn=_collate, persistent_workers=self.workers > 0, prefetch_factor=4 if self.workers else None)

    def describe(self) -> str:
        return f"torch DataLoader + PIL, {self.workers} worker(s)"

    def _keys(self, epoch: int) -> list[tuple[int, int]]:
        """(item, seed) for this rank's padded slice of epoch `epoch`'s global order."""
        n = len(self.items)
        order = list(range(n))
        if self.spec.shuffle:
            random.Random(self.spec.order_seed * 1_000_003 + epoch).shuffle(order)  # same on every rank
        lo, hi = rank_range(n, self.spec.shard_id, self.spec.num_shards)
        mine = order[lo:hi]
        if not mine:
            raise DataError(f"{self.shards.spec}: {n} sample(s) for {self.spec.num_shards} ranks: rank "
                            f"{self.spec.shard_id} has none")
        if self.drop_last:  # training: every rank the same length (DALI's pad_last_batch)
            mine = mine + [mine[-1]] * (self.per_rank - len(mine))
        # a seed per (rank seed, epoch, position), never shared by two of them; a val pass
        # (drop_last=False) uses the same seeds every pass, so random views repeat exactly
        e = epoch if self.drop_last else 0
        return [(item, (self.spec.seed << 64) + (e << 32) + pos) for pos, item in enumerate(mine)]

    def _batches(self, epoch: int) -> list[list[tuple[int, int]]]:
        keys, b = self._keys(epoch), self.spec.batch_size
        batches = [keys[i:i + b] for i in range(0, len(keys), b)]
        if self.drop_last and batches and len(batches[-1]) < b:
            batches.pop()
        return batches

    def _window_batches(self, epoch: int) -> list[list[list]]:
        """Windowed reading (hvdtrain.reading): per window, its batches of (item, seed);
        samples shuffled within their window, whole batches (the last window's partial
        batch dropped in training)."""
        out, pos, b = [], 0, self.spec.batch_size
        for w, view in enumerate(self.reading.parts(epoch)):
            items = index_items(view, self.spec.labels_optional)
            order = list(range(len(items)))
            if self.spec.shuffle:
                random.Random(f"{self.spec.order_seed}-{epoch}-{w}").shuffle(order)
            e = epoch if self.drop_last else 0
            keys = [(items[i], (self.spec.seed << 64) + (e << 32) + pos + k) for k, i in enumerate(order)]
            pos += len(keys)
            batches = [keys[i:i + b] for i in range(0, len(keys), b)]
            if self.drop_last and batches and len(batches[-1]) < b:
                batches.pop()
            out.append(batches)
        return out

    def __len__(self) -> int:
        """Batches per epoch on this rank."""
        if self.reading is not None and self.reading.windowed:
            return sum(map(len, self._window_batches(self.epoch)))
        return len(self._batches(self.epoch))

    def _windows_of_epoch(self):
        """(batches to run, view to fetch) per window, from the position reached."""
        skip = self._batches_done
        views = self.reading.parts(self.epoch)
        for w, batches in enumerate(self._window_batches(self.epoch)):
            if skip >= len(batches):
                skip -= len(batches)
                continue
            self.reading.announce(self.epoch, w)
            yield batches[skip:], views[w]
            skip = 0

    def epoch_batches(self):
        """The rest of the current epoch (all of it, unless resumed or left mid-epoch)."""
        if self.reading is None or not self.reading.windowed:
            yield from self._pass(self._batches(self.epoch)[self._batches_done:])
        else:
            for batches, view in self._windows_of_epoch():
                local = self.reading.local(view)  # bucket data: fetched (pinned) before the workers read it
                try:
                    yield from self._pass(batches)
                finally:
                    self.reading.release(local)
        self.epoch, self._batches_done = self.epoch + 1, 0

    def _pass(self, batches):
        self._plan.batches = batches
        for views, flips, labels, sources in (self._loader if self._plan.batches else ()):
            check_label_range(labels, sources, self.num_classes, self.shards.spec)
            if self.spec.normalize == "kernel":
                views = [to_model_input(v, flips[:, k] if self.spec.random_crop_flip else None, self.device,
                                        self.dtype, self.channels_last) for k, v in enumerate(views)]
            else:
                fmt = torch.channels_last if self.channels_last else torch.contiguous_format
                views = [v.to(self.device, self.dtype, non_blocking=True).contiguous(memory_format=fmt) for v in views]
            self.last_source = decode_source(sources[-1])
            self._batches_done += 1
            yield Batch(views, labels, sources)

    def forever(self):
        while True:
            yield from self.epoch_batches()

    def close(self) -> None:
        """Unpin what this loader holds in the node cache (bucket data)."""
        if self.reading is not None:
            self.reading.close()

    def checkpoint(self) -> bytes:
        return json.dumps({"kind": KIND, "epoch": self.epoch, "batches": self._batches_done}).encode()
