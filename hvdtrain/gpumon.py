"""GPU utilisation through NVML, sampled in a background thread over a measured window.

`nvmlDeviceGetUtilizationRates().gpu` is the share of time at least one kernel ran in
the driver's last sample window; it is not SM occupancy, so reports put throughput
beside it. NVML indices ignore CUDA_VISIBLE_DEVICES: the GPU is found by this process's
CUDA device UUID (falling back to PCI bus id), never by index. With no GPU the result
is "not evaluated" — never 0.0 (a 0.00 % reading beside 1.27 GB of VRAM in use is a
measurement fault, not a reading).

Two readings back the kernel-time figure where the GPU supports them, each "not
evaluated" with NVML's reason where it does not (never 0):
- `sm_util_mean_pct`: NVML GPM's SM utilisation (the share of SMs busy; Hopper and
  newer), from pairs of GPM samples at least GPM_MIN_INTERVAL_S apart;
- `jpg_util_mean_pct`: the hardware JPEG engines' load (`nvmlDeviceGetJpgUtilization`),
  which `nvidia-smi dmon -s u` does not show and `utilization.gpu` does not count.

    mon = GpuMonitor(torch.device("cuda", 0)); mon.start(); ...work...; stats = mon.stop()
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from typing import Any

import torch


# NVML: two GPM samples taken less than 100 ms apart give no meaningful metric
GPM_MIN_INTERVAL_S = 0.2


def not_evaluated(why: str) -> dict:
    return {"evaluated": False, "why": why, "samples": 0, "util_mean_pct": None,
            "util_p10_pct": None, "util_p50_pct": None, "sm_util_mean_pct": None, "sm_util_why": why,
            "jpg_util_mean_pct": None, "jpg_util_why": why}


class GpmSmUtil:
    """NVML GPM's SM utilisation (percent of SMs busy) between consecutive GPM samples.
    `why` is non-empty when it cannot be read: no GPM on this GPU (before Hopper), an
    nvidia-ml-py without the GPM API, or an NVML error (its message)."""

    def __init__(self, nvml: Any, handle: Any):
        self.nvml, self.handle = nvml, handle
        self.values: list[float] = []
        self.why = ""
        self._bufs: list | None = None
        try:
            if not nvml.nvmlGpmQueryDeviceSupport(handle).isSupportedDevice:
                self.why = "NVML GPM is not supported on this GPU (Hopper or newer only)"
                return
            self._bufs = [nvml.nvmlGpmSampleAlloc(), nvml.nvmlGpmSampleAlloc()]
            nvml.nvmlGpmSampleGet(handle, self._bufs[0])
            self._t_prev = time.monotonic()
        except AttributeError as e:
            self.why = f"this nvidia-ml-py has no GPM API ({e})"
        except Exception as e:  # noqa: BLE001 - NVML's reason is the report
            self.why = f"NVML GPM: {e}"
            self.close()

    def tick(self) -> None:
        """A new GPM sample and the SM utilisation since the previous one, once at least
        GPM_MIN_INTERVAL_S has passed (NVML's GPM counters refresh every 100 ms)."""
        if self._bufs is None or time.monotonic() - self._t_prev < GPM_MIN_INTERVAL_S:
            return
        n, (prev, cur) = self.nvml, self._bufs
        try:
            n.nvmlGpmSampleGet(self.handle, cur)
            t = time.monotonic()
            mg = n.c_nvmlGpmMetricsGet_t()
            mg.version, mg.numMetrics = n.NVML_GPM_METRICS_GET_VERSION, 1
            mg.sample1, mg.sample2 = prev, cur
            mg.metrics[0].metricId = n.NVML_GPM_METRIC_SM_UTIL
            m = n.nvmlGpmMetricsGet(mg).metrics[0]
            if m.nvmlReturn != n.NVML_SUCCESS:
                raise n.NVMLError(m.nvmlReturn)
        except Exception as e:  # noqa: BLE001 - a failed reading ends GPM sampling, said why
            self.why = f"NVML GPM SM_UTIL failed after {len(self.values)} reading(s): {e}"
            self.values = []
            self.close()
            return
        self.values.append(float(m.value))
        self._bufs, self._t_prev = [cur, prev], t

    def close(self) -> None:
        for b in self._bufs or []:
            try:
                self.nvml.nvmlGpmSampleFree(b)
            except Exception:  # noqa: BLE001 - freeing is best effort
                pass
        self._bufs = None


def jpg_probe(nvml: Any, handle: Any) -> str:
    """'' when the JPEG engines' load can be read, else why not (NVML's reason)."""
    try:
        nvml.nvmlDeviceGetJpgUtilization(handle)
        return ""
    except AttributeError as e:
        return f"this nvidia-ml-py has no nvmlDeviceGetJpgUtilization ({e})"
    except Exception as e:  # noqa: BLE001 - e.g. NVMLError_NotSupported: no JPEG engine
        return f"nvmlDeviceGetJpgUtilization: {e}"


def _find_handle(nvml: Any, dev: torch.device) -> Any:
    props = torch.cuda.get_device_properties(dev)
    uuid = getattr(props, "uuid", None)
    if uuid is not None:
        want = str(uuid).lower().removeprefix("gpu-")
        for i in range(nvml.nvmlDeviceGetCount()):
            h = nvml.nvmlDeviceGetHandleByIndex(i)
            got = nvml.nvmlDeviceGetUUID(h)
            got = (got.decode() if isinstance(got, bytes) else got).lower().removeprefix("gpu-")
            if got == want:
                return h
    bus = f"{props.pci_domain_id:08x}:{props.pci_bus_id:02x}:{props.pci_device_id:02x}.0"
    return nvml.nvmlDeviceGetHandleByPciBusId(bus.encode())


class GpuMonitor:
    """Samples utilisation, memory, SM clock and power every `interval_s` between
    `start()` and `stop()`. `nvml` and `handle` can be injected (tests use a fake)."""

    def __init__(self, dev: torch.device | None, interval_s: float = 0.1, nvml: Any = None,
                 handle: Any = None):
        self.interval_s = interval_s
        self.samples: list[dict] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.why_not = ""
        self.nvml, self.handle = nvml, handle
        if handle is not None:
            return
        if dev is None or dev.type != "cuda":
            self.why_not = "no GPU"
            return
        try:
            if self.nvml is None:
                import pynvml as nvml_mod  # from nvidia-ml-py

                self.nvml = nvml_mod
            self.nvml.nvmlInit()
            self.handle = _find_handle(self.nvml, dev)
        except Exception as e:  # noqa: BLE001 - any NVML failure means "not evaluated", said why
            self.why_not = f"NVML unavailable: {e}"
            self.handle = None

    def _sample(self) -> dict:
        n, h = self.nvml, self.handle
        util = n.nvmlDeviceGetUtilizationRates(h)
        mem = n.nvmlDeviceGetMemoryInfo(h)
        s = {"t": time.monotonic(), "util_pct": float(util.gpu), "mem_used_gib": mem.used / 2**30}
        if not self._jpg_why:
            try:
                s["jpg_util_pct"] = float(n.nvmlDeviceGetJpgUtilization(h)[0])  # [percent, period us]
            except Exception as e:  # noqa: BLE001 - stops the JPEG readings, says why
                self._jpg_why = f"nvmlDeviceGetJpgUtilization failed mid-window: {e}"
        for key, fn in (("sm_clock_mhz", lambda: n.nvmlDeviceGetClockInfo(h, n.NVML_CLOCK_SM)),
                        ("power_w", lambda: n.nvmlDeviceGetPowerUsage(h) / 1000.0)):
            try:
                s[key] = float(fn())
            except Exception:  # noqa: BLE001 - optional readings
                s[key] = None
        return s

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append(self._sample())
            self._gpm.tick()
            self._stop.wait(self.interval_s)

    def start(self) -> "GpuMonitor":
        if self.handle is not None:
            self._jpg_why = jpg_probe(self.nvml, self.handle)
            self._gpm = GpmSmUtil(self.nvml, self.handle)  # its first sample: the window's start
            self._thread = threading.Thread(target=self._run, name="gpumon", daemon=True)
            self._thread.start()
            self._dmon = start_dmon(self.nvml, self.handle)
        return self

    def stop(self) -> dict:
        if self._thread is None:
            return not_evaluated(self.why_not or "monitor not started")
        self._stop.set()
        self._thread.join()
        self._gpm.close()
        out = summarise(self.samples, self._gpm.values, self._gpm.why, self._jpg_why)
        out["dmon"] = stop_dmon(getattr(self, "_dmon", None))
        return out


class Dmon:
    """`nvidia-smi dmon -s um -i <NVML index>` beside the sampler, as a cross-check, its
    output going to a file as it comes. A pipe read only at stop() would fill (64 KiB:
    about 15 minutes of rows) and block dmon, so its mean would cover less of the window
    than NVML's. Where `stdbuf` exists dmon's stdout is line-buffered, so a row is in the
    file as soon as it is printed; stop() asks it to end with SIGINT (what a person's
    Ctrl-C sends: it exits and flushes), then SIGTERM, then SIGKILL."""

    STOP_WAIT_S = (("SIGINT", 3.0), ("SIGTERM", 2.0))

    def __init__(self, proc: subprocess.Popen, out):
        self.proc, self.out = proc, out

    @classmethod
    def start(cls, nvml: Any, handle: Any) -> "Dmon | None":
        """nvidia-smi counts GPUs as NVML does, so the index comes from the handle, not torch."""
        if shutil.which("nvidia-smi") is None:
            return None
        try:
            idx = nvml.nvmlDeviceGetIndex(handle)
            argv = ["nvidia-smi", "dmon", "-s", "um", "-i", str(idx)]
            if shutil.which("stdbuf"):
                argv = ["stdbuf", "-oL"] + argv
            out = tempfile.TemporaryFile("w+", prefix="hvdtrain-dmon-")
            return cls(subprocess.Popen(argv, stdout=out, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL), out)
        except Exception:  # noqa: BLE001 - the cross-check is optional
            return None

    def stop(self) -> dict:
        import signal

        p = self.proc
        for name, wait_s in self.STOP_WAIT_S:
            if p.poll() is not None:
                break
            p.send_signal(getattr(signal, name))
            try:
                p.wait(timeout=wait_s)
            except subprocess.TimeoutExpired:
                pass
        if p.poll() is None:
            p.kill()
            p.wait()
        self.out.seek(0)
        text = self.out.read()
        self.out.close()
        return parse_dmon(text)


def start_dmon(nvml: Any, handle: Any) -> Dmon | None:
    return Dmon.start(nvml, handle)


def stop_dmon(d: Dmon | None) -> dict:
    if d is None:
        return {"evaluated": False, "why": "nvidia-smi not found"}
    return d.stop()


def parse_dmon(text: str) -> dict:
    """Mean `sm` and `mem` columns of `nvidia-smi dmon -s um` output ('-' readings skipped)."""
    cols, rows = None, []
    for line in text.splitlines():
        parts = line.lstrip("#").split()
        if line.startswith("#") and parts and parts[0] == "gpu":
            cols = parts
        elif cols and parts and not line.startswith("#") and len(parts) == len(cols):
            rows.append(dict(zip(cols, parts)))
    def mean(col):
        vals = [float(r[col]) for r in rows if col in r and r[col].replace(".", "", 1).isdigit()]
        return statistics.fmean(vals) if vals else None
    return {"evaluated": bool(rows), "why": "" if rows else "no dmon rows", "samples": len(rows),
            "sm_mean_pct": mean("sm"), "mem_mean_pct": mean("mem")}


def _pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    k = (len(xs) - 1) * q
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summarise(samples: list[dict], sm_util: list[float] | None = None, sm_why: str = "",
              jpg_why: str = "") -> dict:
    """Mean, p10, p50 of utilisation.gpu and the other readings. `sm_util`: GPM SM
    utilisation readings (`sm_why` when there are none); JPEG load comes from the samples'
    `jpg_util_pct` (`jpg_why` when they have none)."""
    if not samples:
        return not_evaluated("no samples in the window")
    util = [s["util_pct"] for s in samples]
    jpg = [s["jpg_util_pct"] for s in samples if s.get("jpg_util_pct") is not None]
    clocks = [s["sm_clock_mhz"] for s in samples if s.get("sm_clock_mhz") is not None]
    power = [s["power_w"] for s in samples if s.get("power_w") is not None]
    return {"evaluated": True, "why": "", "samples": len(samples),
            "util_mean_pct": statistics.fmean(util), "util_p10_pct": _pct(util, 0.10),
            "util_p50_pct": _pct(util, 0.50),
            "mem_used_max_gib": max(s["mem_used_gib"] for s in samples),
            "sm_clock_mean_mhz": statistics.fmean(clocks) if clocks else None,
            "power_mean_w": statistics.fmean(power) if power else None,
            "sm_util_mean_pct": statistics.fmean(sm_util) if sm_util else None,
            "sm_util_samples": len(sm_util or []),
            "sm_util_why": "" if sm_util else (sm_why or "no GPM reading in the window"),
            "jpg_util_mean_pct": statistics.fmean(jpg) if jpg else None,
            "jpg_util_why": "" if jpg else (jpg_why or "no JPEG-engine reading in the window"),
            "timeline": [(round(s["t"] - samples[0]["t"], 3), s["util_pct"]) for s in samples]}
