"""An entry point's last line, for programs that run it: `EXIT_STATUS <code>`.

    if __name__ == "__main__":
        sys.exit(exitmark.mark(main()))

With HVDTRAIN_EXIT_MARK=1 (set by gpucheck for its steps) the line is printed and
flushed after the report is written, so a crash at interpreter shutdown after it (DALI's
abort with CUDA, `cudaErrorDeviceUninitialized`, NVIDIA/DALI#6166) is told apart from a
failed run: gpucheck.runner.crash_at_exit keeps such a step's results and names the crash.
Off by default: a bench's last line stays its BENCH_JSON.
"""
from __future__ import annotations

import os
import sys

EXIT_MARK = "EXIT_STATUS "
ENV = "HVDTRAIN_EXIT_MARK"


def mark(code: int | None) -> int | None:
    """Print the mark (when asked for) and return `code` unchanged."""
    if os.environ.get(ENV) == "1":
        sys.stderr.flush()
        print(f"{EXIT_MARK}{0 if code is None else code}", flush=True)
    return code
