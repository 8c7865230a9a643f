"""--data.loader=synthetic as users run it: the sanity on 2 ranks with no data at all,
its report saying SYNTHETIC, and the loader SLO not evaluated (there is no reader)."""
import json
import sys

from tests.e2e.harness import HOROVODRUN, run


def test_sanity_on_synthetic_data_two_ranks_says_so_and_measures_no_loader(tmp_path):
    r = run(HOROVODRUN + [sys.executable, "-m", "hvdtrain.sanity", "--preset", "ci", "--data.loader=synthetic",
                          "--train.steps=10", "--run.progress=False", f"--run.dir={tmp_path}/run"])
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "building the embedded synthetic data set" not in r.stdout  # no shards made or read
    fp = "synthetic-8x2x3x32x32-c1000-seed1337"
    assert f"data    train: SYNTHETIC, no reader: 2 view(s) of 8x3x32x32" in r.stdout
    assert "hvdtrain sanity: GO on SYNTHETIC data" in r.stdout and "verdict: GO (on SYNTHETIC data)" in r.stdout
    rep = json.load(open(tmp_path / "run" / "sanity.json"))
    assert rep["synthetic"] is True and rep["data"]["train"]["fingerprint"] == fp and rep["loader_img_s"] is None
    slo = {s["name"]: s for s in rep["slos"]}["loader_img_s"]
    assert slo["passed"] is None and slo["not_evaluated"] == "synthetic data: no reader to measure"
    assert rep["data_wait_share"] < 0.2  # batches are already on the device: next to no wait
    assert rep["loss_reduction"] > 0  # the model fits the 4 cycled batches
    assert "on SYNTHETIC data" in (tmp_path / "run" / "sanity.md").read_text().splitlines()[0]
