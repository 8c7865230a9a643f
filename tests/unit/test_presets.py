"""The named presets resolve to exactly the configs recorded here: each preset's values on
top of the dataclass defaults (`Config()`), kept as data so a change to a preset shows
up as a change to this table."""
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
    cfg = C.PRESETS[name]()
    assert cfg.preset == name
    got = changed(cfg)
    assert got == EXPECTED[name]
    for key, value in got.items():  # equal and of the same type (1 == 1.0 == True would pass above)
        assert type(value) is type(EXPECTED[name][key]), key
