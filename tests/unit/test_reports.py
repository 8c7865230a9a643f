"""What a run leaves behind: files written atomically by any number of writers, and
curves.png with only the panels that have data."""
import json
import os
import threading

import pytest
from PIL import Image

from hvdtrain import report
from hvdtrain.data import files


def test_writers_of_one_path_each_use_their_own_temporary_file(tmp_path, monkeypatch):
    path = str(tmp_path / "summary.json")
    names = set()
    real_open = open

    def spying_open(p, *a, **kw):
        if str(p).startswith(path + ".tmp"):
            names.add(str(p))
        return real_open(p, *a, **kw)
    monkeypatch.setattr("builtins.open", spying_open)
    barrier = threading.Barrier(4)

    def writer(k):
        barrier.wait()
        for _ in range(50):
            report.write_json(path, {"writer": k, "pad": "x" * 4096})
    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(names) == 4  # one temporary name per thread, never shared
    assert json.load(real_open(path))["writer"] in range(4)  # whole: one writer's file, not a mix
    assert os.listdir(tmp_path) == ["summary.json"]


def test_a_failed_write_leaves_the_old_file_and_no_temporary_one(tmp_path):
    path = tmp_path / "best.txt"
    files.write_atomic(str(path), "old")
    with pytest.raises(ZeroDivisionError):
        with files.atomic_file(str(path)) as f:
            f.write(b"half of the new")
            1 / 0
    assert path.read_text() == "old" and os.listdir(tmp_path) == ["best.txt"]


def write_metrics(path, val: bool):
    with open(path, "w") as f:
        for step in (1, 2, 3, 4):
            f.write(json.dumps({"step": step, "train_loss": 2.0 / step, "lr": 0.002}) + "\n")
            if val and step % 2 == 0:
                f.write(json.dumps({"step": step, "val_loss": 2.5 / step, "val_top1": 0.1 * step,
                                    "val_top5": 0.2 * step, "val_samples": 64}) + "\n")


@pytest.mark.parametrize("val,panels", [(True, ["loss", "val accuracy", "learning rate"]),
                                        (False, ["loss", "learning rate"])])
def test_curves_draw_only_the_panels_with_data(tmp_path, val, panels):
    metrics = tmp_path / "metrics.jsonl"
    write_metrics(metrics, val)
    assert report.curve_panels(*report.read_curves(str(metrics))) == panels
    png = report.curves_plot(str(metrics), str(tmp_path / "curves.png"), "a run")
    with Image.open(png) as im:  # 400 px per panel at 100 dpi
        assert im.format == "PNG" and im.size == (400 * len(panels), 340)
