"""Is this GPU node healthy and fast? `make gpu-check` (= `python -m gpucheck`): gpucheck/check.py."""
