"""SLO definitions and the NVML sampler (with a scripted fake NVML)."""
import json
import types

import pytest

from hvdtrain import slo as S
from hvdtrain.gpumon import GpuMonitor, summarise


def test_defaults_are_the_seeds():
    d = S.load()
    assert (d["loader_img_s"].threshold, d["loss_reduction"].threshold, d["sanity_time_min"].threshold,
            d["gpu_util_pct"].threshold) == (300, 0.15, 25, 85)


def test_overrides_from_json_and_toml(tmp_path):
    (tmp_path / "s.json").write_text(json.dumps({"loader_img_s": 500}))
    (tmp_path / "s.toml").write_text("gpu_util_pct = 90\n")
    assert S.load(str(tmp_path / "s.json"))["loader_img_s"].threshold == 500
    assert S.load(str(tmp_path / "s.toml"))["gpu_util_pct"].threshold == 90
    (tmp_path / "bad.json").write_text(json.dumps({"loader_imgs": 1}))
    with pytest.raises(ValueError, match="unknown SLO 'loader_imgs'"):
        S.load(str(tmp_path / "bad.json"))


def test_pass_fail_not_evaluated_and_verdict():
    d = S.load()
    r = [S.check(d["loader_img_s"], 301), S.check(d["sanity_time_min"], 26), S.check(d["gpu_util_pct"], None, "no GPU")]
    assert [S.status(x) for x in r] == ["PASS", "FAIL", "NOT EVALUATED"]
    assert r[2]["passed"] is None and r[2]["not_evaluated"] == "no GPU"
    assert S.verdict(r) == "NO-GO" and S.verdict([r[0], r[2]]) == "GO"
    assert "NOT EVALUATED (no GPU)" in S.table(r, d)


class FakeNvml:
    """Scripted readings: utilisation 10, 20, ..., then holds the last."""
    NVML_CLOCK_SM = 1

    def __init__(self, utils):
        self.utils, self.i = list(utils), 0

    def nvmlDeviceGetUtilizationRates(self, h):
        u = self.utils[min(self.i, len(self.utils) - 1)]
        self.i += 1
        return types.SimpleNamespace(gpu=u)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=2 * 2**30)

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1980

    def nvmlDeviceGetPowerUsage(self, h):
        return 350_000


def test_sampler_statistics_with_fake_nvml():
    mon = GpuMonitor(None, interval_s=0.01, nvml=FakeNvml([10, 20, 30, 40, 50, 60, 70, 80, 90, 100]), handle=1)
    import time
    mon.start()
    time.sleep(0.3)
    r = mon.stop()
    assert r["evaluated"] and r["samples"] >= 10
    assert r["mem_used_max_gib"] == 2 and r["sm_clock_mean_mhz"] == 1980 and r["power_mean_w"] == 350
    s = summarise([{"t": i, "util_pct": u, "mem_used_gib": 1} for i, u in enumerate(range(0, 101, 10))])
    assert (s["util_mean_pct"], s["util_p10_pct"], s["util_p50_pct"]) == (50, 10, 50)


def test_no_gpu_is_not_evaluated_never_zero():
    r = GpuMonitor(None).start().stop()
    assert r["evaluated"] is False and r["util_mean_pct"] is None and r["why"] == "no GPU"


def test_parse_nvidia_smi_dmon_output():
    from hvdtrain.gpumon import parse_dmon
    text = """# gpu    sm   mem   enc   dec   jpg   ofa    fb  bar1  ccpm
# Idx     %     %     %     %     %     %    MB    MB    MB
    0    90    40     0     0     -     -  1300     5     0
    0    80    20     0     0     -     -  1300     5     0
"""
    r = parse_dmon(text)
    assert r["evaluated"] and r["samples"] == 2 and r["sm_mean_pct"] == 85 and r["mem_mean_pct"] == 30
    assert parse_dmon("")["evaluated"] is False


def test_utilisation_timeline_plot(tmp_path):
    from hvdtrain.report import util_plot
    s = summarise([{"t": i * 0.1, "util_pct": u, "mem_used_gib": 1} for i, u in enumerate([0, 50, 90, 95, 97])])
    path = util_plot(str(tmp_path / "gpu_util.png"), s["timeline"])
    from PIL import Image
    with Image.open(path) as png:  # decodes: a real picture of the timeline
        assert png.format == "PNG" and png.size == (660, 330)


# A stand-in for `nvidia-smi dmon` that prints fast and long: ROWS rows at once (~40 x a
# pipe's 64 KiB, what a real dmon prints in hours at one row a second), a file to say it
# got through them, then a row every 10 ms until SIGINT, when it exits (and flushes).
FAKE_SMI = r'''#!{py}
import os, signal, sys, time
assert sys.argv[1:4] == ["dmon", "-s", "um"], sys.argv
print("# gpu    sm   mem   enc   dec   jpg   ofa    fb  bar1  ccpm")
print("# Idx     %     %     %     %     %     %    MB    MB    MB")
row = "    0    60    30     0     0     -     -  1300     5     0"
for _ in range({rows}):
    print(row)
open({done!r}, "w").close()
try:
    while True:
        print(row)
        time.sleep(0.01)
except KeyboardInterrupt:
    pass
'''
ROWS = 40_000


def test_the_dmon_cross_check_keeps_every_row_of_a_long_run(tmp_path, monkeypatch):
    """dmon's output goes to a file as it comes: a pipe read only at stop() filled and
    blocked dmon after ~1,100 rows (about 15 minutes of a real run), so its mean covered
    less of the window than NVML's."""
    import os
    import sys
    import time

    class Indexed(FakeNvml):
        def nvmlDeviceGetIndex(self, h):
            return 0

    done = tmp_path / "printed-them-all"
    smi = tmp_path / "nvidia-smi"
    smi.write_text(FAKE_SMI.format(py=sys.executable, rows=ROWS, done=str(done)))
    smi.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}{os.pathsep}{os.environ['PATH']}")
    mon = GpuMonitor(None, interval_s=0.05, nvml=Indexed([50]), handle=1).start()
    t0 = time.monotonic()
    while not done.exists() and time.monotonic() - t0 < 30:
        time.sleep(0.05)
    blocked = not done.exists()
    r = mon.stop()
    assert not blocked, "dmon was blocked writing its rows: nobody read them while it ran"
    d = r["dmon"]
    assert d["evaluated"] and d["samples"] >= ROWS and d["sm_mean_pct"] == 60, {k: d[k] for k in ("why", "samples")}
