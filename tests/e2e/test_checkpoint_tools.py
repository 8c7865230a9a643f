"""What users do with a finished run: `hvdtrain.evaluate` (under real horovodrun) and
`hvdtrain.export`, on checkpoints of real 2-rank runs over real shards."""
import json
import os
import sys

import pytest
import torch
import webdataset as wds

from hvdtrain.data.wds import Sample, write_split
from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import model as M
from tests.conftest import jpeg
from tests.e2e.harness import CI, HOROVODRUN, TRAIN, hvd, run

EVALUATE = [sys.executable, "-m", "hvdtrain.evaluate"]
EXPORT = [sys.executable, "-m", "hvdtrain.export"]


@pytest.fixture(scope="module")
def classified(tmp_path_factory, synth_data):
    """A finished 8-step classify run on 2 ranks, validated at its end: best.pt is its last step."""
    d = tmp_path_factory.mktemp("classified")
    r = run(HOROVODRUN + TRAIN + CI + [f"--data.train={synth_data}/train", f"--data.val={synth_data}/val",
                                       "--train.steps=8", f"--run.dir={d}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    return d / "run"


def last_val(run_dir) -> dict:
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for x in recs if "val_loss" in x][-1]


# ---------------------------------------------------------------- evaluate
def test_evaluate_two_ranks_gives_the_runs_own_final_val_top1(classified, synth_data, tmp_path):
    r = run(HOROVODRUN + EVALUATE + ["--checkpoint", str(classified), f"--data.val={synth_data}/val",
                                     "--json", str(tmp_path / "eval.json")])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    last = r.stdout.strip().splitlines()[-1]
    assert last.split(":", 1)[-1].startswith("EVAL_JSON ")  # rank 0's last line (horovodrun prefixes it)
    j = json.loads(last.split("EVAL_JSON ", 1)[1])
    assert j == json.load(open(tmp_path / "eval.json"))
    val = last_val(classified)
    assert val["step"] == 8 and j["step"] == 8
    assert (j["top1"], j["top5"], j["samples"]) == (val["val_top1"], val["val_top5"], val["val_samples"])
    assert j["loss"] == pytest.approx(val["val_loss"], rel=1e-9)
    assert j["checkpoint"] == f"{classified}/best.pt" and "best.pt: the lowest val loss" in j["chosen"]
    saved = json.load(open(classified / "config.json"))  # the provenance is the run's, not this checkout's
    assert j["trained"]["git_sha"] == saved["git_sha"] and j["trained"]["config_hash"] == saved["config_hash"]
    assert j["trained"]["data_fingerprint"] == saved["data_fingerprint"] and j["ranks"] == 2
    assert j["images_per_s"] > 0 and "(the run's own val data)" in r.stdout
    assert f"top-1 {j['top1']:>10.4f}".replace(" ", "") in r.stdout.replace(" ", "")


def write_foreign(tmp_path) -> dict:
    """Val sets that do not fit the 10-class head: 5 classes; 10 differently named; no
    _info.json with labels up to 11."""
    five, renamed = tmp_path / "five", tmp_path / "renamed"
    write_split((Sample(f"f{i:04d}", jpeg(i), i % 5) for i in range(20)), str(five), [f"class{c:03d}" for c in range(5)],
                "val", 32)
    names = [f"class{c:03d}" for c in range(10)]
    names[3] = "zebra"
    write_split((Sample(f"n{i:04d}", jpeg(i), i % 10) for i in range(20)), str(renamed), names, "val", 32)
    with wds.ShardWriter(str(tmp_path / "wide-%06d.tar"), maxcount=40) as sink:
        for i in range(24):
            sink.write({"__key__": f"w{i:05d}", "jpg": jpeg(i), "cls": str(i % 12)})
    return {"five": str(five), "renamed": str(renamed), "wide": str(tmp_path / "wide-000000.tar")}


def test_evaluate_refuses_classes_that_do_not_fit_naming_both(classified, tmp_path):
    data = write_foreign(tmp_path)
    head = f"checkpoint {classified}/best.pt"
    want = {"five": f"{head} has a 10-class head but the data {data['five']} has 5 classes",
            "renamed": f"{head} and the data {data['renamed']} name their classes differently (first differences, "
                       f"index: checkpoint vs data: [(3, 'class003', 'zebra')]",
            "wide": f"{head} has a 10-class head but the data {data['wide']} has labels up to 11"}
    for name, msg in want.items():
        r = run(EVALUATE + ["--checkpoint", str(classified), f"--data.val={data[name]}"], timeout=120)
        assert r.returncode == 2 and msg in r.stderr, (name, r.stderr[-2000:])
        assert "EVAL_JSON" not in r.stdout
    r = run(EVALUATE + ["--checkpoint", str(classified), "--optim.lr=1"], timeout=60)
    assert r.returncode == 2 and "the model, task and input size come from the checkpoint" in r.stderr


# ---------------------------------------------------------------- export
def checkpoint_model(path) -> tuple[torch.nn.Module, dict]:
    payload = ckpt.load(str(path))
    cfg = C.from_dict(payload["config"])
    model = M.build(cfg.model, payload["num_classes"] if cfg.train.task == "classify" else None)
    model.load_state_dict(payload["model"])
    return model.eval(), payload


@pytest.mark.parametrize("out,flag", [("model.safetensors", None), ("model.bin", "pt")])
def test_export_classify_loads_into_hvdtrain_model_with_bit_equal_outputs(classified, tmp_path, out, flag):
    from hvdtrain.export import load, read_weights

    r = run(EXPORT + ["--checkpoint", str(classified), "--out", str(tmp_path / out)] + (["--format", flag] if flag
                                                                                      else []), timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    doc = json.load(open(tmp_path / "model.json"))
    original, payload = checkpoint_model(classified / "best.pt")
    assert doc["weights"]["format"] == (flag or "safetensors") and doc["encoder"] is None
    assert doc["num_classes"] == 10 and doc["classes"] == [f"class{c:03d}" for c in range(10)]
    assert doc["provenance"]["git_sha"] == payload["provenance"]["git_sha"] and doc["checkpoint"]["step"] == 8
    assert doc["input"]["size"] == 32 and doc["model"]["name"] == "convnet"
    rebuilt = M.build(C.ModelConfig(**doc["model"]), doc["num_classes"])  # what a user does with the JSON
    rebuilt.load_state_dict(read_weights(str(tmp_path / out)))
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = original(x)
        assert torch.equal(rebuilt.eval()(x), want) and torch.equal(load(str(tmp_path / out))(x), want)


def test_export_contrastive_writes_the_encoder_alone_too(tmp_path, synth_data):
    """A 1-step contrastive ResNet-18 (a projection head over the encoder), on one rank."""
    r = run(hvd(1) + TRAIN + ["--preset", "ci", "--run.progress=False", "--run.tensorboard=False",
                              f"--data.train={synth_data}/train", "--train.steps=1", "--train.grad_accum_steps=1",
                              "--model.name=resnet18", "--model.small_stem=True", "--data.size=16",
                              f"--run.dir={tmp_path}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    r = run(EXPORT + ["--checkpoint", str(tmp_path / "run"), "--out", str(tmp_path / "r18.safetensors")], timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "the run folder's newest checkpoint; it has no best.pt" in r.stdout
    from hvdtrain.export import load, read_weights

    doc = json.load(open(tmp_path / "r18.json"))
    assert doc["task"] == "contrastive" and doc["num_classes"] is None and doc["encoder"]["module"] == "ResNet"
    original, _ = checkpoint_model(tmp_path / "run" / "ckpt-00000001.pt")
    enc = read_weights(str(tmp_path / "r18.encoder.safetensors"))
    whole = read_weights(str(tmp_path / "r18.safetensors"))
    assert set(whole) == {f"encoder.{k}" for k in enc} | {k for k in whole if k.startswith("head.")}
    assert all(torch.equal(enc[k], whole[f"encoder.{k}"]) for k in enc)
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.equal(load(str(tmp_path / "r18.encoder.safetensors"))(x), original.encoder(x))
        assert torch.equal(load(str(tmp_path / "r18.safetensors"))(x), original(x))


def test_export_refuses_a_suffix_and_a_format_that_disagree(tmp_path):
    from hvdtrain.export import ExportError, choose_format

    assert choose_format("a.safetensors", None) == "safetensors" and choose_format("a.pth", None) == "pt"
    with pytest.raises(ExportError, match="says safetensors but --format pt"):
        choose_format("a.safetensors", "pt")
    with pytest.raises(ExportError, match="no format from its suffix"):
        choose_format("a.bin", None)
    assert not os.path.exists(tmp_path / "a.json")
