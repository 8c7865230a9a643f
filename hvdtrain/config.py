"""One config tree, named presets, and `--section.key=value` overrides.

    python -m hvdtrain.sanity --preset ci --train.steps=20 --data.train=/data/train

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
import typing
from dataclasses import dataclass, field


class ConfigError(ValueError):
    """A bad preset name, override key or value."""


@dataclass
class DataConfig:
    train: str = ""          # directory of shards, a .tar, or a brace pattern (train-{000..009}.tar)
    val: str = ""            # same, for validation; "" = no validation data
    size: int = 64           # output crop side, pixels
    min_scale: float = 0.25  # random-resized-crop area range, lower bound (fraction of image)
    threads: int = 24        # DALI CPU threads requested; capped to cores per local rank
    prefetch: int = 2        # DALI prefetch queue depth, batches
    decode: str = "auto"     # auto | cpu | mixed (mixed = nvJPEG on the GPU)
    shuffle_buffer: int = 1024  # DALI initial_fill: samples in the shuffle buffer
    normalize: str = "auto"  # auto | dali | kernel (uint8 out of DALI, kernels.normalize on the
                             # training device); auto = kernel with decode=cpu, dali with mixed
    channels_last: bool = False  # model input in channels_last memory format


@dataclass
class AugConfig:
    mixup: float = 0.0       # mixup Beta(alpha, alpha); 0 = off (task=classify only)
    cutmix: float = 0.0      # cutmix Beta(alpha, alpha); 0 = off (task=classify only)
    switch_prob: float = 0.5  # with both on: probability of cutmix for a batch
    label_smoothing: float = 0.0  # classify: smoothing of the (soft) targets


@dataclass
class ModelConfig:
    name: str = "convnet"    # convnet (the sanity encoder)
    width: int = 32          # channels of the first conv stage; doubles each stage
    embed_dim: int = 256     # encoder output / projection dimension
    temperature: float = 0.1  # InfoNCE temperature


@dataclass
class TrainConfig:
    steps: int = 200         # optimizer steps (each = grad_accum_steps micro-batches)
    batch_size: int = 16     # micro-batch per rank, images
    grad_accum_steps: int = 8  # micro-batches per optimizer step (horovod backward_passes_per_step)
    log_every: int = 10      # optimizer steps between console/metrics lines (a host sync point)
    task: str = "contrastive"  # contrastive (two-view InfoNCE) | classify
    torch_threads: int = 0   # 0 = cores per local rank


@dataclass
class OptimConfig:
    name: str = "adamw"      # adamw | sgd
    lr: float = 0.0005       # learning rate, not scaled (the sanity's seed value)
    weight_decay: float = 0.0
    momentum: float = 0.9    # sgd only


@dataclass
class RunConfig:
    dir: str = ""            # run folder; "" = runs/<run-id>/
    name: str = "run"        # prefix of the generated run id


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
def sanity() -> Config:
    """The seed's Day-2 GO/NO-GO configuration (batch 16 x accum 8, lr 5e-4, embed 256)."""
    cfg = Config(preset="sanity")
    cfg.data.size = 48  # crops of the 64 px synthetic images: 200 steps fit in ~5 min on 2 CPU cores
    cfg.run.name = "sanity"
    return cfg


def ci() -> Config:
    """Seconds-long: for tests. Same model and step, fewer and smaller everything."""
    cfg = Config(preset="ci")
    cfg.data.size = 32
    cfg.data.threads = 1
    cfg.data.shuffle_buffer = 64
    cfg.model.width = 8
    cfg.model.embed_dim = 32
    cfg.train.steps = 20
    cfg.train.batch_size = 8
    cfg.train.grad_accum_steps = 2
    cfg.train.log_every = 2
    cfg.optim.lr = 0.002
    cfg.run.name = "ci"
    return cfg


PRESETS: dict[str, typing.Callable[[], Config]] = {"sanity": sanity, "ci": ci}


# ---------------------------------------------------------------- overrides
def _coerce(value: typing.Any, typ: typing.Any, key: str) -> typing.Any:
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if typ is str and not isinstance(value, str):
        return str(value)
    if typ in (int, float, bool, str) and type(value) is not typ:
        raise ConfigError(f"--{key}: expected {typ.__name__}, got {value!r} ({type(value).__name__})")
    return value


def set_key(cfg: Config, key: str, raw: str) -> None:
    """Set `section.key` (or a top-level `key`) from its command-line text."""
    parts = key.split(".")
    obj: typing.Any = cfg
    for i, part in enumerate(parts):
        names = {f.name: f for f in dataclasses.fields(obj)}
        if part not in names:
            where = ".".join(parts[:i]) or "the top level"
            raise ConfigError(f"unknown config key --{key}: {where} has {sorted(names)}")
        if i < len(parts) - 1:
            obj = getattr(obj, part)
            if not dataclasses.is_dataclass(obj):
                raise ConfigError(f"--{key}: {'.'.join(parts[:i + 1])} is not a section")
    hints = typing.get_type_hints(type(obj))
    typ = hints[parts[-1]]
    if dataclasses.is_dataclass(typ):
        raise ConfigError(f"--{key} is a section; set one of its keys")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        value = raw  # a bare word: a string
    setattr(obj, parts[-1], _coerce(value, typ, key))


def parse_args(argv: list[str], default_preset: str = "sanity",
               extra_flags: tuple[str, ...] = ()) -> tuple[Config, dict[str, str]]:
    """Parse `[--preset NAME] [--a.b=value ...]`. Returns (config, extra flag values).

    `extra_flags` names plain `--flag=value` / `--flag value` options a command adds
    (for example `--slo`); everything else must be a config key.
    """
    preset = default_preset
    overrides: list[tuple[str, str]] = []
    extras: dict[str, str] = {}
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--"):
            raise ConfigError(f"unexpected argument {arg!r}: use --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = next(it, None)
            if value is None:
                raise ConfigError(f"--{key} needs a value")
        if key == "preset":
            preset = value
        elif key in extra_flags:
            extras[key] = value
        else:
            overrides.append((key, value))
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose from {sorted(PRESETS)}")
    cfg = PRESETS[preset]()
    for key, value in overrides:
        set_key(cfg, key, value)
    validate(cfg)
    return cfg, extras


def validate(cfg: Config) -> None:
    t = cfg.train
    if t.steps < 1 or t.batch_size < 1 or t.grad_accum_steps < 1:
        raise ConfigError("train.steps, train.batch_size and train.grad_accum_steps must be >= 1")
    if t.task not in ("contrastive", "classify"):
        raise ConfigError(f"train.task must be contrastive or classify, not {t.task!r}")
    if cfg.data.decode not in ("auto", "cpu", "mixed"):
        raise ConfigError(f"data.decode must be auto, cpu or mixed, not {cfg.data.decode!r}")
    if cfg.data.normalize not in ("auto", "dali", "kernel"):
        raise ConfigError(f"data.normalize must be auto, dali or kernel, not {cfg.data.normalize!r}")
    if (cfg.aug.mixup > 0 or cfg.aug.cutmix > 0) and t.task != "classify":
        raise ConfigError("aug.mixup / aug.cutmix need train.task=classify")
    if cfg.optim.name not in ("adamw", "sgd"):
        raise ConfigError(f"optim.name must be adamw or sgd, not {cfg.optim.name!r}")
    if not 0 < cfg.data.min_scale <= 1:
        raise ConfigError("data.min_scale must be in (0, 1]")


# ---------------------------------------------------------------- serialisation
def to_dict(cfg: Config) -> dict:
    return dataclasses.asdict(cfg)


def config_hash(cfg: Config) -> str:
    """Hash of what changes the maths: the run folder's name is left out."""
    d = to_dict(cfg)
    d["run"] = {k: v for k, v in d["run"].items() if k not in ("dir", "name")}
    blob = json.dumps(d, sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def from_dict(d: dict) -> Config:
    cfg = Config()
    for section, values in d.items():
        if isinstance(values, dict):
            for k, v in values.items():
                setattr(getattr(cfg, section), k, v)
        else:
            setattr(cfg, section, values)
    return cfg
