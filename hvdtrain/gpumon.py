"""GPU utilisation through NVML, sampled in a background thread over a measured window.

`nvmlDeviceGetUtilizationRates().gpu` is the share of time at least one kernel ran in
the driver's last sample window; it is not SM occupancy, so reports put throughput
beside it. NVML indices ignore CUDA_VISIBLE_DEVICES: the GPU is found by this process's
CUDA device UUID (falling back to PCI bus id), never by index. With no GPU the result
is "not evaluated" — never 0.0 (the seed's 0.00 % was a measurement fault).

    mon = GpuMonitor(torch.device("cuda", 0)); mon.start(); ...work...; stats = mon.stop()
"""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time
from typing import Any

import torch


def not_evaluated(why: str) -> dict:
    return {"evaluated": False, "why": why, "samples": 0, "util_mean_pct": None,
            "util_p10_pct": None, "util_p50_pct": None}


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
            self._stop.wait(self.interval_s)

    def start(self) -> "GpuMonitor":
        if self.handle is not None:
            self._thread = threading.Thread(target=self._run, name="gpumon", daemon=True)
            self._thread.start()
            self._dmon = start_dmon(self.nvml, self.handle)
        return self

    def stop(self) -> dict:
        if self._thread is None:
            return not_evaluated(self.why_not or "monitor not started")
        self._stop.set()
        self._thread.join()
        out = summarise(self.samples)
        out["dmon"] = stop_dmon(getattr(self, "_dmon", None))
        return out


def start_dmon(nvml: Any, handle: Any) -> subprocess.Popen | None:
    """`nvidia-smi dmon -s um -i <NVML index>` beside the sampler, as a cross-check.
    nvidia-smi counts GPUs as NVML does, so the index comes from the handle, not torch."""
    if shutil.which("nvidia-smi") is None:
        return None
    try:
        idx = nvml.nvmlDeviceGetIndex(handle)
        return subprocess.Popen(["nvidia-smi", "dmon", "-s", "um", "-i", str(idx)], stdout=subprocess.PIPE,
                                stderr=subprocess.DEVNULL, text=True)
    except Exception:  # noqa: BLE001 - the cross-check is optional
        return None


def stop_dmon(p: subprocess.Popen | None) -> dict:
    if p is None:
        return {"evaluated": False, "why": "nvidia-smi not found"}
    p.terminate()
    try:
        out, _ = p.communicate(timeout=5)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate()
    return parse_dmon(out)


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


def summarise(samples: list[dict]) -> dict:
    if not samples:
        return not_evaluated("no samples in the window")
    util = [s["util_pct"] for s in samples]
    clocks = [s["sm_clock_mhz"] for s in samples if s.get("sm_clock_mhz") is not None]
    power = [s["power_w"] for s in samples if s.get("power_w") is not None]
    return {"evaluated": True, "why": "", "samples": len(samples),
            "util_mean_pct": statistics.fmean(util), "util_p10_pct": _pct(util, 0.10),
            "util_p50_pct": _pct(util, 0.50),
            "mem_used_max_gib": max(s["mem_used_gib"] for s in samples),
            "sm_clock_mean_mhz": statistics.fmean(clocks) if clocks else None,
            "power_mean_w": statistics.fmean(power) if power else None,
            "timeline": [(round(s["t"] - samples[0]["t"], 3), s["util_pct"]) for s in samples]}
