"""The presets are TOML files (hvdtrain/presets/*.toml) that resolve to exactly the
configs recorded here: each preset's values on top of the dataclass defaults (`Config()`),
kept as data so a change to a preset shows up as a change to this table. A user's own
file is read the same way, and its mistakes are refused naming the file and the key."""
import pytest

from hvdtrain import config as C

# what each preset sets that differs from the dataclass defaults, flattened as section.key
EXPECTED = {
    "sanity": {"data.size": 48, "run.name": "sanity"},
    "ci": {"data.size": 32, "data.threads": 1, "data.shuffle_buffer": 64, "model.width": 8, "model.embed_dim": 32,
           "train.steps": 40, "train.batch_size": 8, "train.grad_accum_steps": 2, "train.log_every": 2,
           "optim.lr": 0.002, "run.name": "ci"},
    "tinyimagenet": {"data.min_scale": 0.35, "data.threads": 8, "aug.label_smoothing": 0.1,
                     "model.name": "resnet18", "model.small_stem": True, "train.steps": 30000,
                     "train.batch_size": 128, "train.grad_accum_steps": 1, "train.log_every": 50,
                     "train.task": "classify", "train.eval_every": 2000, "train.ckpt_every": 2000,
                     "optim.name": "sgd", "optim.lr": 0.2, "optim.lr_ref_batch": 256, "optim.weight_decay": 0.0005,
                     "optim.nesterov": True, "optim.schedule": "cosine", "optim.warmup_steps": 800,
                     "run.name": "tinyimagenet"},
    "resnet50": {"data.size": 224, "data.min_scale": 0.08, "data.threads": 8, "data.channels_last": True,
                 "aug.label_smoothing": 0.1, "model.name": "resnet50", "train.steps": 112612,
                 "train.batch_size": 256, "train.grad_accum_steps": 1, "train.log_every": 100,
                 "train.task": "classify", "train.eval_every": 5005, "train.ckpt_every": 5005, "optim.name": "sgd",
                 "optim.lr": 0.1, "optim.lr_ref_batch": 256, "optim.weight_decay": 0.0001, "optim.schedule": "cosine",
                 "optim.warmup_steps": 6250, "run.name": "resnet50"},
}


def changed(cfg: C.Config) -> dict:
    """{section.key: value} where `cfg` differs from Config(), the preset name left out."""
    base, mine = C.to_dict(C.Config()), C.to_dict(cfg)
    out = {}
    for section, values in mine.items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v for k, v in values.items() if v != base[section][k]})
        elif section != "preset" and values != base[section]:
            out[section] = values
    return out


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_each_preset_resolves_to_its_recorded_config(name):
    cfg = C.preset(name)
    assert cfg.preset == name
    assert C.to_dict(C.parse_args(["--preset", name])[0]) == C.to_dict(cfg)
    got = changed(cfg)
    assert got == EXPECTED[name]
    for key, value in got.items():  # equal and of the same type (1 == 1.0 == True would pass above)
        assert type(value) is type(EXPECTED[name][key]), key


def test_the_packaged_presets_are_the_recorded_ones():
    assert C.preset_names() == sorted(EXPECTED)


def test_a_users_file_with_overrides_on_top(tmp_path):
    mine = tmp_path / "mine.toml"
    mine.write_text('seed = 7\n[train]\nsteps = 12\ntask = "classify"\n[optim]\nlr = 1  # an int, taken as 1.0\n'
                    'step_at = [0.5]\n')
    cfg, _ = C.parse_args(["--preset", str(mine), "--train.steps=5"])
    assert cfg.preset == "mine.toml" and cfg.seed == 7 and cfg.train.task == "classify"
    assert cfg.train.steps == 5  # the command line wins over the file
    assert cfg.optim.lr == 1.0 and isinstance(cfg.optim.lr, float) and cfg.optim.step_at == [0.5]
    assert changed(cfg) == {"seed": 7, "train.steps": 5, "train.task": "classify", "optim.lr": 1.0,
                            "optim.step_at": [0.5]}


@pytest.mark.parametrize("text,msg", [
    ("[data]\nsize = 32\nbogus = 1\n", "unknown config key data.bogus: data has "),
    ("[nope]\nx = 1\n", "unknown config key nope.x: the top level has "),
    ("[train]\nsteps = \"ten\"\n", "train.steps: expected int, got 'ten'"),
    ("[train]\nsteps = 1.5\n", "train.steps: expected int"),
    ("train = 3\n", "train is a section"),
    ("[data.sub]\nx = 1\n", "unknown config key data.sub"),
    ("preset = \"ci\"\n", "'preset' cannot be set in a preset file"),
    ("[train\n", "not valid TOML"),
])
def test_a_users_file_with_a_mistake_is_refused_naming_file_and_key(tmp_path, text, msg):
    mine = tmp_path / "mine.toml"
    mine.write_text(text)
    with pytest.raises(C.ConfigError) as e:
        C.parse_args(["--preset", str(mine)])
    assert str(e.value).startswith(f"{mine}: ") and msg in str(e.value), str(e.value)


def test_unknown_preset_names_the_choices_and_a_missing_file_is_named(tmp_path):
    with pytest.raises(C.ConfigError, match=r"unknown preset 'huge'; choose from \['ci', 'resnet50'"):
        C.parse_args(["--preset=huge"])
    with pytest.raises(C.ConfigError, match=f"--preset {tmp_path}/none.toml: cannot read it"):
        C.parse_args(["--preset", f"{tmp_path}/none.toml"])
