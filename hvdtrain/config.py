"""One config tree, named presets, and `--section.key=value` overrides.

    python -m hvdtrain.sanity --preset ci --train.steps=20 --data.train=/data/train
    python -m hvdtrain.train --preset path/to/mine.toml --optim.lr=0.1

A preset is a TOML file holding only what differs from the dataclass defaults below:
the packaged ones are `hvdtrain/presets/<name>.toml` (sanity, ci, tinyimagenet,
resnet50), and `--preset` also takes a path to a user's own file. Its keys are checked
as overrides are (unknown keys and wrong types refused, naming the file).
Overrides are parsed with `ast.literal_eval` (a bare word that is not a Python literal
is taken as a string) and type-checked against the dataclass field; an unknown key is
an error. The resolved config is written as JSON into the run folder, and its hash
(`config_hash`) goes into every report so two runs can be told apart.
"""
from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import os
import tomllib
import typing
import zlib
from importlib import resources
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad preset name, override key or value."""


@dataclass
class DataConfig:
    train: str = ""          # directory of shards, a .tar, or a brace pattern (train-{000..009}.tar)
    val: str = ""            # same, for validation; "" = no validation data
    num_classes: int = 0     # classify: classes of shards without _info.json (0 = max label + 1, from the
                             # labels read when their indexes were built); with _info.json it must agree
    index_dir: str = ""      # where DALI indexes are looked for first and built if missing ("" = beside
                             # the tars, else the cache, $HVDTRAIN_CACHE or ~/.cache/hvdtrain, for
                             # read-only data sets): data/shards.py
    size: int = 64           # output crop side, pixels
    min_scale: float = 0.25  # random-resized-crop area range, lower bound (fraction of image)
    threads: int = 24        # DALI CPU threads requested; capped to cores per local rank
    prefetch: int = 2        # DALI prefetch queue depth, batches
    decode: str = "auto"     # auto | cpu | mixed (mixed = nvJPEG on the GPU)
    hw_decoder_load: float = 0.99  # mixed decode: share of images for the hardware JPEG decoder (the rest
                             # entropy-decode on the CPU threads); MLPerf's H100 ResNet-50 setting. Unmeasured
                             # without a GPU: `bench.loader --hw-decoder-load 0,0.65,0.9,0.99` on a GPU picks it
    loader: str = "dali"     # dali | torch (DataLoader + PIL, the baseline) | synthetic (random batches made
                             # on the device, no reader; num_classes 0 = 1000: hvdtrain/synthetic.py)
    shuffle_buffer: int = 1024  # DALI initial_fill: samples in the shuffle buffer
    normalize: str = "auto"  # auto | dali | kernel (uint8 out of DALI, kernels.normalize on the
                             # training device); auto = kernel for decode=cpu feeding a GPU (a quarter
                             # of float32's PCIe bytes), else dali (in DALI's threads: on a CPU-only
                             # machine kernel would run on the training thread, 2x slower measured)
    antialias: bool = False  # antialiased resize: costs ~20 % of the CPU loader's img/s (measured,
                             # docs/benchmarks.md); RRC downscales <= 2x at 224 px from ImageNet sizes
    fast_idct: bool = True   # libjpeg-turbo's fast IDCT in the CPU decoder (+3 % measured, "little
                             # reduction in quality" per libjpeg-turbo)
    channels_last: bool = False  # model input in channels_last memory format (the weights stay
                                 # contiguous: Horovod 0.28 allreduces contiguous gradients only)
    shuffle: bool = True     # train: shuffle (off = shard order, for equality tests)
    shard_shuffle: str = "auto"  # on | off | auto (on unless _info.json says the samples were written
                             # shuffled, as data.make_shards and data.synth write them): train, with shuffle,
                             # each epoch reads chunks of every tar in a new order, the same on every rank
                             # (data/dataset.py; it rebuilds the pipeline each epoch); off = DALI's order
    interleave_chunk: int = 0  # shard_shuffle: samples per chunk; 0 = total / 8192 within [4, 256]
    augment: bool = True     # train: random-resized crop + flip (off = the val resize + centre crop)
    val_batch_size: int = 0  # validation batch per rank, images; 0 = train.batch_size
    on_error: str = "stop"   # stop | skip: what a bad sample in training does (see docs/reliability.md)
    # bucket data (train / val = s3://bucket/prefix/ or gs://...): data/remote.py, data/nodecache.py
    remote: str = "cache"    # cache: whole shards streamed into a node-local cache ahead of the reader |
                             # direct: DALI reads the bucket itself (a ranged GET per sample member)
    cache_dir: str = ""      # node-local folder for shards from a bucket; "" = $HVDTRAIN_SHARD_CACHE,
                             # else $TMPDIR (or /tmp)/hvdtrain-shards-$USER
    cache_gb: float = 0.0    # bound on that folder, GB (1e9 bytes); 0 = min(100, half its disk's free space)
    window_shards: int = 0   # shards per reader window (one DALI pipeline over shards already cached,
                             # the next built in the background); 0 = 8 for bucket data read through the
                             # cache, none (one pipeline per epoch) for local folders. N > 0 reads local
                             # folders in windows too: the same samples per step as a bucket run
    fetch_workers: int = 8   # concurrent ranged GETs of a node's fetcher (16 MiB each)
    remote_retry_s: float = 60.0  # seconds a failing request is retried (backoff, resumed from the byte
                             # reached) with no progress before the run stops, naming the URL


@dataclass
class AugConfig:
    mixup: float = 0.0       # mixup Beta(alpha, alpha); 0 = off (task=classify only)
    cutmix: float = 0.0      # cutmix Beta(alpha, alpha); 0 = off (task=classify only)
    switch_prob: float = 0.5  # with both on: probability of cutmix for a batch
    label_smoothing: float = 0.0  # classify: smoothing of the (soft) targets


@dataclass
class ModelConfig:
    name: str = "convnet"    # convnet (the sanity encoder, GroupNorm) | resnet18 | resnet50
    width: int = 32          # convnet: channels of the first stage; doubles each stage
    embed_dim: int = 256     # convnet output / contrastive projection dimension
    temperature: float = 0.1  # InfoNCE temperature
    norm: str = "bn"         # resnets: bn (BatchNorm, per rank) | gn (GroupNorm: batch-independent)
    small_stem: bool = False  # resnets: 3x3 stride-1 stem, no max-pool (for 32-64 px inputs)
    gather_negatives: bool = False  # contrastive: negatives from every rank's batch (allgather)


@dataclass
class TrainConfig:
    steps: int = 200         # optimizer steps (each = grad_accum_steps micro-batches)
    batch_size: int = 16     # micro-batch per rank, images
    grad_accum_steps: int = 8  # micro-batches per optimizer step (horovod backward_passes_per_step)
    log_every: int = 10      # optimizer steps between console/metrics lines (a host sync point)
    task: str = "contrastive"  # contrastive (two-view InfoNCE) | classify
    torch_threads: int = 0   # 0 = cores per local rank
    amp: str = "auto"        # auto (bf16 on CUDA, off on CPU) | off | bf16 | fp16 (with GradScaler)
    fp16_allreduce: bool = False  # horovod Compression.fp16 for gradients
    clip_grad_norm: float = 0.0   # max global gradient L2 norm; 0 = no clipping
    eval_every: int = 0      # optimizer steps between validation passes; 0 = only at the end
    val_loss_bound: float = 3.0  # stop if val loss > this x ln(num_classes) (contrastive: ln(batch)); 0 = off
    ckpt_every: int = 0      # optimizer steps between checkpoints; 0 = only at the end
    keep_last: int = 3       # checkpoints kept (plus best.pt)
    elastic: bool = False    # Horovod elastic (horovodrun --min-np/--max-np --host-discovery-script)
    commit_every: int = 10   # elastic: optimizer steps between in-memory commits (the rollback point)


@dataclass
class OptimConfig:
    name: str = "adamw"      # adamw | sgd
    lr: float = 0.0005       # learning rate at lr_ref_batch images per step (the sanity's seed value)
    lr_ref_batch: int = 0    # 0 = lr is used as is; N = lr per N images, scaled by global batch / N
                             # (global batch = batch_size x ranks x grad_accum_steps)
    weight_decay: float = 0.0
    wd_norm_bias: bool = False  # False: no weight decay on norm weights and biases (1-d params)
    momentum: float = 0.9    # sgd only
    nesterov: bool = False   # sgd only
    schedule: str = "constant"  # constant | cosine | step
    warmup_steps: int = 0    # linear warm-up from 0, optimizer steps
    min_lr_ratio: float = 0.0   # cosine: final lr as a fraction of the peak
    step_at: list = field(default_factory=lambda: [0.3, 0.6, 0.8])  # step: fractions of train.steps
    step_gamma: float = 0.1  # step: lr multiplier at each of step_at


@dataclass
class RunConfig:
    dir: str = ""            # run folder; "" = runs/<run-id>/
    name: str = "run"        # prefix of the generated run id
    resume: str = ""         # "" = fresh start | auto (newest good checkpoint in run.dir) | a .pt path
    resume_anyway: bool = False  # resume despite a different config hash or data fingerprint
    progress: bool = True    # rank 0 tqdm progress bar
    tensorboard: bool = True  # TensorBoard event files in the run folder
    watchdog_s: float = 120.0  # a collective that waits longer than this ends the job (0 = off)


@dataclass
class Config:
    data: DataConfig = field(default_factory=DataConfig)
    aug: AugConfig = field(default_factory=AugConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    run: RunConfig = field(default_factory=RunConfig)
    seed: int = 1337
    preset: str = "sanity"


# ---------------------------------------------------------------- presets
PRESET_DIR = "presets"  # hvdtrain/presets/<name>.toml, shipped as package data (setup.py)


def preset_names() -> list[str]:
    """The packaged presets: sanity, ci, tinyimagenet, resnet50."""
    return sorted(p.name[:-5] for p in resources.files("hvdtrain").joinpath(PRESET_DIR).iterdir()
                  if p.name.endswith(".toml"))


def preset(name: str) -> Config:
    """The config of a packaged preset (`ci`) or of a user's TOML file (`path/to/mine.toml`:
    any name ending in .toml or holding a /). A file holds only what differs from the
    dataclass defaults, as `[section]` tables of `key = value`; unknown keys and values of
    the wrong type are refused, naming the file."""
    if name.endswith(".toml") or os.sep in name or "/" in name:
        where, label = name, os.path.basename(name)
        try:
            with open(name, "rb") as f:
                raw = f.read()
        except OSError as e:
            raise ConfigError(f"--preset {name}: cannot read it ({e.strerror or e})") from None
    else:
        if name not in preset_names():
            raise ConfigError(f"unknown preset {name!r}; choose from {preset_names()} or give a .toml file")
        res = resources.files("hvdtrain").joinpath(PRESET_DIR, f"{name}.toml")
        where, label, raw = str(res), name, res.read_bytes()
    try:
        doc = tomllib.loads(raw.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise ConfigError(f"{where}: not valid TOML: {e}") from None
    cfg = Config(preset=label)
    for key, value in doc.items():
        if key == "preset":
            raise ConfigError(f"{where}: 'preset' cannot be set in a preset file (the file's name is the preset)")
        for sub, v in value.items() if isinstance(value, dict) else [(None, value)]:
            full = key if sub is None else f"{key}.{sub}"
            try:
                set_value(cfg, full, v, full)
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
    return cfg


# short flags a user types, mapped to config keys; None = a switch (no value)
ALIASES: dict[str, tuple[str, str | None]] = {
    "task": ("train.task", None), "resume": ("run.resume", None),
    "resume-anyway": ("run.resume_anyway", "True"), "steps": ("train.steps", None),
    "elastic": ("train.elastic", "True"),
}


# ---------------------------------------------------------------- overrides
def _coerce(value: typing.Any, typ: typing.Any, label: str) -> typing.Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and not isinstance(value, str):
        return str(value)
    if typ in (int, float, bool, str) and type(value) is not typ:
        raise ConfigError(f"{label}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")
    return value


def set_value(cfg: Config, key: str, value: typing.Any, label: str) -> None:
    """Set `section.key` (or a top-level `key`) to a Python value, type-checked against the
    dataclass field. `label`: how messages name the key (`--train.steps`, `train.steps`)."""
    parts = key.split(".")
    obj: typing.Any = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key {label}: {where} has {sorted(names)}")
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"{label}: {'.'.join(parts[:i + 1])} is not a section")
    typ = typing.get_type_hints(type(obj))[parts[-1]]
    if dataclasses.is_dataclass(typ):
        raise ConfigError(f"{label} is a section; set one of its keys")
    setattr(obj, parts[-1], _coerce(value, typ, label))


def set_key(cfg: Config, key: str, raw: str) -> None:
    """Set `section.key` (or a top-level `key`) from its command-line text."""
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string
    set_value(cfg, key, value, f"--{key}")


def parse_args(argv: list[str], default_preset: str = "sanity", extra_flags: tuple[str, ...] = (),
               defaults: dict[str, str] | None = None) -> tuple[Config, dict[str, str]]:
    """Parse `[--preset NAME] [--a.b=value ...]`. Returns (config, extra flag values).

    `extra_flags` names plain `--flag=value` / `--flag value` options a command adds
    (for example `--slo`); everything else must be a config key. `defaults` are a
    command's own overrides of the preset (`{"train.steps": "20"}` for bench.throughput),
    applied before the user's, so any spelling of the user's flag wins.
    """
    preset_name = default_preset
    overrides: list[tuple[str, str]] = []
    extras: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if key in ALIASES:
            key, fixed = ALIASES[key]
            if fixed is not None and not eq:
                value, eq = fixed, "="
        if not eq:
            value = next(it, None)
            if value is None:
                raise ConfigError(f"--{key} needs a value")
        if key == "preset":
            preset_name = value
        elif key in extra_flags:
            extras[key] = value
        else:
            overrides.append((key, value))
    cfg = preset(preset_name)
    for key, value in list((defaults or {}).items()) + overrides:
        set_key(cfg, key, value)
    validate(cfg)
    return cfg, extras


def validate(cfg: Config) -> None:
    from hvdtrain import model, task  # the registries own the names (they do not import this module)

    t = cfg.train
    if t.steps < 1 or t.batch_size < 1 or t.grad_accum_steps < 1:
        raise ConfigError("train.steps, train.batch_size and train.grad_accum_steps must be >= 1")
    if t.task not in task.TASKS:
        raise ConfigError(f"train.task must be {' or '.join(task.TASKS)}, not {t.task!r}")
    if cfg.data.decode not in ("auto", "cpu", "mixed"):
        raise ConfigError(f"data.decode must be auto, cpu or mixed, not {cfg.data.decode!r}")
    if cfg.data.normalize not in ("auto", "dali", "kernel"):
        raise ConfigError(f"data.normalize must be auto, dali or kernel, not {cfg.data.normalize!r}")
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and t.task != "classify":
        raise ConfigError("aug.mixup / aug.cutmix need train.task=classify")
    if cfg.optim.name not in ("adamw", "sgd"):
        raise ConfigError(f"optim.name must be adamw or sgd, not {cfg.optim.name!r}")
    if not 0 < cfg.optim.lr < 3.4e38:  # NaN fails too; past float32's range torch's SGD dies with a bare traceback
        raise ConfigError(f"optim.lr must be a positive number below 3.4e38 (float32's largest), not {cfg.optim.lr!r}")
    if not 0 < cfg.data.min_scale <= 1:
        raise ConfigError("data.min_scale must be in (0, 1]")
    if cfg.data.num_classes < 0:
        raise ConfigError("data.num_classes must be >= 0 (0 = from _info.json or the labels)")
    if cfg.data.interleave_chunk < 0:
        raise ConfigError("data.interleave_chunk must be >= 0 (0 = automatic)")
    if cfg.data.window_shards < 0 or cfg.data.cache_gb < 0 or cfg.data.fetch_workers < 1 or cfg.data.remote_retry_s <= 0:
        raise ConfigError("data.window_shards and data.cache_gb must be >= 0, data.fetch_workers >= 1 and "
                          "data.remote_retry_s > 0")
    if not 0 <= cfg.data.hw_decoder_load <= 1:
        raise ConfigError("data.hw_decoder_load must be in [0, 1]")
    choices = {"model.name": (cfg.model.name, model.names()),
               "data.loader": (cfg.data.loader, ("dali", "torch", "synthetic")),
               "data.shard_shuffle": (cfg.data.shard_shuffle, ("auto", "on", "off")),
               "model.norm": (cfg.model.norm, ("bn", "gn")),
               "train.amp": (t.amp, ("auto", "off", "bf16", "fp16")),
               "optim.schedule": (cfg.optim.schedule, ("constant", "cosine", "step")),
               "data.on_error": (cfg.data.on_error, ("stop", "skip")),
               "data.remote": (cfg.data.remote, ("cache", "direct"))}
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key} must be one of {', '.join(allowed)}, not {value!r}")
    if cfg.data.loader == "synthetic" and (cfg.data.train or cfg.data.val):
        raise ConfigError(f"data.loader=synthetic reads no data, but data.train={cfg.data.train!r} / "
                          f"data.val={cfg.data.val!r} were given: drop them, or choose data.loader=dali")
    if cfg.model.gather_negatives and t.task != "contrastive":
        raise ConfigError("model.gather_negatives needs train.task=contrastive")


def derive_seed(seed: int, stream: str, rank: int) -> int:
    """A 31-bit seed for one random stream ("dali-train", "dali-val", "host", ...) of one
    rank: independent streams, so no rank's val seed equals another rank's train seed."""
    import numpy as np

    state = np.random.SeedSequence([seed, zlib.crc32(stream.encode()), rank]).generate_state(1)[0]
    return int(state) & 0x7FFFFFFF


# ---------------------------------------------------------------- serialisation
def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


# keys that do not change the maths: how often a run logs, evaluates and saves, and how
# a bad sample is handled; a resumed run may change them without --resume-anyway
CADENCE = {"train": ("log_every", "eval_every", "ckpt_every", "keep_last", "val_loss_bound", "commit_every"),
           "data": ("train", "val", "on_error", "val_batch_size", "index_dir", "remote", "cache_dir", "cache_gb",
                    "fetch_workers", "remote_retry_s")}


def config_hash(cfg: Config) -> str:
    """Hash of what changes the maths. Left out: the run section (folder, resume, display),
    the data paths (the data fingerprint stands for the data, wherever it lives) and the
    cadence keys above."""
    d = to_dict(cfg)
    d.pop("run")
    for section, keys in CADENCE.items():
        d[section] = {k: v for k, v in d[section].items() if k not in keys}
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def from_dict(d: dict) -> Config:
    cfg = Config()
    for section, values in d.items():
        if isinstance(values, dict):
            for k, v in values.items():
                if not hasattr(getattr(cfg, section), k):
                    raise ConfigError(f"unknown config key {section}.{k} (a config from another version?)")
                setattr(getattr(cfg, section), k, v)
        else:
            setattr(cfg, section, values)
    return cfg
