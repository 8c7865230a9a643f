"""GPM SM utilisation and JPEG-engine load in the NVML sampler, against a scripted NVML.

The fake follows pynvml's real signatures and uses its real ctypes structures and
constants (nvidia-ml-py 13.615.71): nvmlGpmQueryDeviceSupport(device) -> c_nvmlGpmSupport_t,
nvmlGpmSampleAlloc() -> c_nvmlGpmSample_t, nvmlGpmSampleGet(device, sample),
nvmlGpmMetricsGet(c_nvmlGpmMetricsGet_t) with per-metric nvmlReturn, nvmlGpmSampleFree,
nvmlDeviceGetJpgUtilization(handle) -> [percent, sampling period us]. It checks what real
NVML requires: samples allocated and not yet freed, taken in order, >= 100 ms apart.
"""
import ctypes
import statistics
import time
import types

import pynvml

from hvdtrain.gpumon import GPM_MIN_INTERVAL_S, GpuMonitor, not_evaluated


class FakeNvml:
    NVML_CLOCK_SM = 1
    # the real structures and constants, so a wrong field or constant name fails here too
    c_nvmlGpmMetricsGet_t = pynvml.c_nvmlGpmMetricsGet_t
    NVML_GPM_METRICS_GET_VERSION = pynvml.NVML_GPM_METRICS_GET_VERSION
    NVML_GPM_METRIC_SM_UTIL = pynvml.NVML_GPM_METRIC_SM_UTIL
    NVML_SUCCESS = pynvml.NVML_SUCCESS
    NVMLError = pynvml.NVMLError

    def __init__(self, gpm=True, sm_utils=(60, 70, 80, 90), jpg=(40,), metric_ret=pynvml.NVML_SUCCESS):
        self.gpm, self.sm_utils, self.jpg, self.metric_ret = gpm, list(sm_utils), list(jpg), metric_ret
        self.taken: dict[int, float] = {}   # sample buffer address -> when it was filled
        self.live: dict[int, object] = {}   # allocated, not freed
        self.violations: list[str] = []
        self.metric_calls = 0

    # --- the readings every sampler takes
    def nvmlDeviceGetUtilizationRates(self, h):
        return types.SimpleNamespace(gpu=50)

    def nvmlDeviceGetMemoryInfo(self, h):
        return types.SimpleNamespace(used=2**30)

    def nvmlDeviceGetClockInfo(self, h, which):
        return 1980

    def nvmlDeviceGetPowerUsage(self, h):
        return 300_000

    # --- JPEG engines
    def nvmlDeviceGetJpgUtilization(self, handle):
        if not self.jpg:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return [self.jpg[0], 166_666]

    # --- GPM
    def nvmlGpmQueryDeviceSupport(self, device):
        s = pynvml.c_nvmlGpmSupport_t()
        s.version, s.isSupportedDevice = pynvml.NVML_GPM_SUPPORT_VERSION, int(self.gpm)
        return s

    def nvmlGpmSampleAlloc(self):
        buf = pynvml.struct_c_nvmlGpmSample_t()
        ptr = ctypes.pointer(buf)
        self.live[ctypes.addressof(buf)] = buf
        assert isinstance(ptr, pynvml.c_nvmlGpmSample_t)
        return ptr

    def _addr(self, sample) -> int:
        return ctypes.addressof(sample.contents)

    def nvmlGpmSampleGet(self, device, gpmSample):
        a = self._addr(gpmSample)
        if a not in self.live:
            self.violations.append("SampleGet on a freed or foreign buffer")
        self.taken[a] = time.monotonic()
        return gpmSample

    def nvmlGpmMetricsGet(self, metricsGet):
        mg = metricsGet
        if not isinstance(mg, pynvml.c_nvmlGpmMetricsGet_t) or mg.version != pynvml.NVML_GPM_METRICS_GET_VERSION:
            self.violations.append("bad metricsGet struct or version")
        a1, a2 = self._addr(mg.sample1), self._addr(mg.sample2)
        t1, t2 = self.taken.get(a1), self.taken.get(a2)
        if a1 == a2 or t1 is None or t2 is None or not t2 > t1:
            self.violations.append("samples not two distinct buffers filled in order")
        elif t2 - t1 < 0.1:
            self.violations.append(f"samples {t2 - t1:.3f} s apart (NVML needs >= 0.1 s)")
        if mg.numMetrics != 1 or mg.metrics[0].metricId != pynvml.NVML_GPM_METRIC_SM_UTIL:
            self.violations.append("asked for something other than SM_UTIL")
        m = mg.metrics[0]
        m.nvmlReturn = self.metric_ret
        m.value = self.sm_utils[min(self.metric_calls, len(self.sm_utils) - 1)]
        self.metric_calls += 1
        return mg

    def nvmlGpmSampleFree(self, gpmSample):
        self.live.pop(self._addr(gpmSample), None)


def sample_for(nvml, seconds: float) -> dict:
    mon = GpuMonitor(None, interval_s=0.01, nvml=nvml, handle=object()).start()
    time.sleep(seconds)
    return mon.stop()


def test_gpm_sm_util_and_jpeg_load_are_sampled():
    nvml = FakeNvml()
    r = sample_for(nvml, 4.5 * GPM_MIN_INTERVAL_S)
    assert nvml.violations == []
    n = r["sm_util_samples"]
    assert n >= 2 and n == nvml.metric_calls
    assert r["sm_util_mean_pct"] == statistics.fmean(([60, 70, 80, 90] + [90] * n)[:n])
    assert r["sm_util_why"] == ""
    assert r["jpg_util_mean_pct"] == 40 and r["jpg_util_why"] == ""
    assert r["util_mean_pct"] == 50
    assert nvml.live == {}  # both GPM buffers freed


def test_unsupported_is_not_evaluated_with_nvmls_reason_never_zero():
    nvml = FakeNvml(gpm=False, jpg=())
    r = sample_for(nvml, 0.05)
    assert r["evaluated"] and r["util_mean_pct"] == 50  # the kernel-time figure is still there
    assert r["sm_util_mean_pct"] is None and "not supported" in r["sm_util_why"]
    assert r["jpg_util_mean_pct"] is None and "Not Supported" in r["jpg_util_why"]
    assert nvml.metric_calls == 0


def test_a_failed_gpm_metric_is_not_evaluated():
    nvml = FakeNvml(metric_ret=pynvml.NVML_ERROR_NOT_SUPPORTED)
    r = sample_for(nvml, 1.5 * GPM_MIN_INTERVAL_S)
    assert r["sm_util_mean_pct"] is None and "Not Supported" in r["sm_util_why"]
    assert nvml.live == {}


def test_older_pynvml_without_gpm_says_so():
    class Older:  # an nvidia-ml-py from before GPM and JPEG-engine readings
        NVML_CLOCK_SM = 1
        nvmlDeviceGetUtilizationRates = FakeNvml.nvmlDeviceGetUtilizationRates
        nvmlDeviceGetMemoryInfo = FakeNvml.nvmlDeviceGetMemoryInfo

    r = sample_for(Older(), 0.05)
    assert r["sm_util_mean_pct"] is None and "no GPM API" in r["sm_util_why"]
    assert r["jpg_util_mean_pct"] is None and "no nvmlDeviceGetJpgUtilization" in r["jpg_util_why"]


def test_no_gpu_has_the_new_keys_as_not_evaluated():
    r = GpuMonitor(None).start().stop()
    assert r["sm_util_mean_pct"] is None and r["jpg_util_mean_pct"] is None
    assert r["sm_util_why"] == r["jpg_util_why"] == "no GPU"
    assert set(not_evaluated("x")) >= {"sm_util_mean_pct", "sm_util_why", "jpg_util_mean_pct", "jpg_util_why"}
