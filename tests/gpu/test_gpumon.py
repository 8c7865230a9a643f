"""The NVML sampler on a real GPU: it samples the GPU this process runs on, found by
UUID, when CUDA_VISIBLE_DEVICES renames the devices (a subprocess, since CUDA reads the
variable once); `nvidia-smi dmon` parsing on the real command's output; the sampler's own
dmon cross-check gets rows; GPM and JPEG readings are a value or a reason, never a bare 0."""
import json
import os
import shutil
import sys

import pytest

from hvdtrain.gpumon import parse_dmon
from tests.e2e.harness import run
from tests.gpu.common import GPU, skip_expected

pytestmark = GPU

# a busy window on CUDA device 0, sampled; prints what the sampler found as JSON
BUSY = r"""
import json, time, torch, pynvml
from hvdtrain.gpumon import GpuMonitor
dev = torch.device("cuda", 0)
x = torch.randn(4096, 4096, device=dev)
mon = GpuMonitor(dev, interval_s=0.05).start()
t0 = time.time()
while time.time() - t0 < 3.0:
    for _ in range(20):
        y = x @ x
    torch.cuda.synchronize()
r = mon.stop()
u = pynvml.nvmlDeviceGetUUID(mon.handle)
r.pop("timeline", None)
print(json.dumps({"uuid": u.decode() if isinstance(u, bytes) else u, "summary": r}))
"""


def nvml_uuids() -> list[str]:
    import pynvml

    pynvml.nvmlInit()
    out = []
    for i in range(pynvml.nvmlDeviceGetCount()):
        u = pynvml.nvmlDeviceGetUUID(pynvml.nvmlDeviceGetHandleByIndex(i))
        out.append(u.decode() if isinstance(u, bytes) else u)
    return out


@pytest.mark.parametrize("order", ["last-gpu-by-uuid", "reversed"])
def test_the_sampler_finds_this_processs_gpu_under_cuda_visible_devices(order):
    uuids = nvml_uuids()
    if order == "reversed":
        if len(uuids) < 2:
            skip_expected("one GPU: there is no other order to put the devices in")
        visible = ",".join(str(i) for i in reversed(range(len(uuids))))
    else:
        visible = uuids[-1]  # with several GPUs, CUDA's device 0 is then NVML's last
    r = run([sys.executable, "-c", BUSY], timeout=120, env={**os.environ, "CUDA_VISIBLE_DEVICES": visible})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["uuid"] == uuids[-1], f"sampled {out['uuid']}, but this process ran on {uuids[-1]}"
    s = out["summary"]
    assert s["evaluated"] and s["samples"] >= 10 and s["util_mean_pct"] > 50, s  # 3 s of matmuls
    for key in ("sm_util", "jpg_util"):
        value, why = s[f"{key}_mean_pct"], s[f"{key}_why"]
        assert (value is None) == bool(why), f"{key}: value {value!r} and reason {why!r}"
        assert value is None or 0 <= value <= 100
    if s["sm_util_mean_pct"] is not None:
        assert s["sm_util_mean_pct"] > 0, "GPM read 0 % SMs busy during matmuls"
    d = s["dmon"]
    if shutil.which("nvidia-smi"):
        assert d["evaluated"] and d["samples"] >= 1, f"the dmon cross-check got no rows: {d}"


def test_dmon_parsing_on_the_real_commands_output():
    import subprocess

    if shutil.which("nvidia-smi") is None:
        pytest.skip("no nvidia-smi on PATH: the sampler's dmon cross-check is not evaluated on this machine")
    text = subprocess.run(["nvidia-smi", "dmon", "-s", "um", "-c", "3", "-i", "0"], capture_output=True,
                          text=True, timeout=60).stdout
    r = parse_dmon(text)
    assert r["evaluated"] and r["samples"] == 3, text
    assert r["sm_mean_pct"] is not None and 0 <= r["sm_mean_pct"] <= 100, text
    assert r["mem_mean_pct"] is not None and 0 <= r["mem_mean_pct"] <= 100, text
