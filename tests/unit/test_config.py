import json

import pytest

from hvdtrain import config as C


def test_presets_and_overrides():
    cfg, extra = C.parse_args(["--preset", "ci", "--train.steps=7", "--optim.lr=1e-3", "--data.train=/x/{0..2}.tar",
                               "--seed", "5", "--slo=s.json"], extra_flags=("slo",))
    assert cfg.preset == "ci" and cfg.train.steps == 7 and cfg.optim.lr == 1e-3
    assert cfg.data.train == "/x/{0..2}.tar" and cfg.seed == 5 and extra == {"slo": "s.json"}


def test_sanity_preset_is_the_seed_configuration():
    cfg = C.preset("sanity")
    assert (cfg.train.batch_size, cfg.train.grad_accum_steps, cfg.data.threads) == (16, 8, 24)
    assert (cfg.optim.lr, cfg.model.embed_dim, cfg.seed, cfg.train.steps) == (0.0005, 256, 1337, 200)


@pytest.mark.parametrize("arg,msg", [
    ("--train.stepz=3", "unknown config key --train.stepz"),
    ("--nope.x=1", "unknown config key --nope.x"),
    ("--train.steps=abc", "expected int"),
    ("--train.steps=1.5", "expected int"),
    ("--train=3", "is a section"),
    ("--train.task=regress", "contrastive or classify"),
    ("--optim.lr=1e39", "optim.lr must be a positive number below 3.4e38"),
    ("--optim.lr=0", "optim.lr must be a positive number"),
])
def test_bad_overrides_are_errors(arg, msg):
    with pytest.raises(C.ConfigError, match=msg):
        C.parse_args([arg])


def test_unknown_preset():
    with pytest.raises(C.ConfigError, match="unknown preset"):
        C.parse_args(["--preset=huge"])


def test_int_promotes_to_float_and_hash_ignores_run_dir():
    a, _ = C.parse_args(["--optim.lr=1", "--run.dir=/tmp/a"])
    b, _ = C.parse_args(["--optim.lr=1.0", "--run.dir=/tmp/b"])
    assert isinstance(a.optim.lr, float)
    assert C.config_hash(a) == C.config_hash(b)
    c, _ = C.parse_args(["--optim.lr=2.0"])
    assert C.config_hash(c) != C.config_hash(a)
    assert C.to_dict(C.from_dict(json.loads(json.dumps(C.to_dict(a))))) == C.to_dict(a)
