"""The benches' own logic: a ceiling must bound its loaders, the sweep plan pairs each
loader with its ceiling at the same setting, and the tuner prefers cheaper ties."""
import argparse

from hvdtrain.bench.loader import compare, settings
from hvdtrain.bench.tune import overrides, pick, thread_counts


def test_a_loader_above_its_ceiling_is_reported_as_a_bench_bug():
    results = {"dali-cpu": {"img_s": 900.0, "ceiling_key": "ceiling-cpu"}, "ceiling-cpu": {"img_s": 1000.0},
               "torch": {"img_s": 1200.0, "ceiling_key": "ceiling-cpu"}}
    err = compare(results)
    assert results["dali-cpu"]["vs_ceiling"] == 0.9 and results["torch"]["vs_ceiling"] == 1.2
    assert err.startswith("bench bug: a ceiling does not bound its loader") and "torch runs at 1.20x" in err
    del results["torch"]
    assert compare(results) is None


def test_every_dali_setting_is_measured_beside_its_ceiling():
    a = argparse.Namespace(loader="all", threads="4,8", hw_decoder_load="0,0.99", workers=0)
    plan = settings(a)
    gpu = [(t, h) for n, t, h in plan if n == "dali-gpu"]
    assert gpu == [(t, h) for n, t, h in plan if n == "ceiling-gpu"] == [(4, 0.0), (4, 0.99), (8, 0.0), (8, 0.99)]
    assert [t for n, t, _ in plan if n == "ceiling-cpu"] == [4, 8]
    assert [n for n, *_ in plan].count("pil-decode") == 1  # one core whatever the thread count
    assert [n for n, *_ in plan].count("synthetic") == 1  # no reader, no threads: once
    # a single loader still gets its ceiling, at its own setting (torch: its worker count)
    one = argparse.Namespace(loader="dali-cpu", threads="2", hw_decoder_load="", workers=0)
    assert settings(one) == [("dali-cpu", 2, None), ("ceiling-cpu", 2, None)]
    workers = argparse.Namespace(loader="torch", threads="1", hw_decoder_load="", workers=4)
    assert settings(workers) == [("torch", 4, None), ("ceiling-cpu", 4, None)]


def test_the_tuner_prefers_the_cheaper_of_two_equal_settings():
    fast_dear = {"img_s": 1000.0, "cpu_cores_used": 2.0, "threads": 2, "prefetch": 2, "hw_decoder_load": None}
    equal_cheap = {"img_s": 985.0, "cpu_cores_used": 1.2, "threads": 1, "prefetch": 2, "hw_decoder_load": None}
    slower = {"img_s": 900.0, "cpu_cores_used": 0.5, "threads": 1, "prefetch": 1, "hw_decoder_load": None}
    assert pick([fast_dear, equal_cheap, slower]) is equal_cheap and pick([fast_dear, slower]) is fast_dear
    assert pick([]) is None and pick([{"img_s": None, "error": "x"}]) is None
    assert overrides(equal_cheap, gpu=False) == "--data.threads=1 --data.prefetch=2"
    assert thread_counts(6) == [1, 2, 4, 6] and thread_counts(1) == [1]


def test_the_loader_bench_reads_shards_as_training_does_and_marks_rebuilds(tmp_path):
    """Shards written shuffled are read in DALI's order, with no pipeline rebuild in the
    timed windows (bench.loader used to interleave them, rebuilding every epoch there);
    shards not written shuffled are interleaved, as training does, and each window an
    epoch's rebuild fell in is counted and starred in the table."""
    from hvdtrain.bench.loader import parser, window_cells
    from hvdtrain.bench.loader_runs import run_one
    from hvdtrain.data.shards import open_shards
    from hvdtrain.data.wds import Sample, write_split
    from tests.conftest import jpeg, unique_shards

    a = parser().parse_args(["--size", "32", "--batch-size", "8", "--threads", "1", "--windows", "3",
                             "--window-batches", "4", "--warmup", "1"])
    unique_shards(str(tmp_path / "plain"), n=32, shard_size=16)  # 4 batches an epoch
    assert not open_shards(str(tmp_path / "plain")).shuffled
    plain = run_one("dali-cpu", open_shards(str(tmp_path / "plain")), a, 1)
    assert plain["window_rebuilds"] == [1, 1, 1], plain  # every window crosses an epoch end
    assert window_cells(plain).count("*") == 3

    write_split((Sample(f"u{i:07d}", jpeg(i), i % 10) for i in range(32)), str(tmp_path / "mixed"),
                [str(c) for c in range(10)], "train", 16, extra={"shuffled": True})
    shuffled = run_one("dali-cpu", open_shards(str(tmp_path / "mixed")), a, 1)
    assert shuffled["rebuilds_in_windows"] == 0 and "*" not in window_cells(shuffled), shuffled
    assert shuffled["img_s"] > 0
