# nvidia/__init__.py for a .venv that sees an image's packages (install/setup.sh, system mode).
#
# NVIDIA's wheels share the top-level folder nvidia/: DALI (nvidia/dali), nvImageCodec and
# nvJPEG in .venv, NCCL, cuDNN and cuBLAS in the image. Some of those wheels ship an
# nvidia/__init__.py (nvImageCodec's is this line; nvjpeg2k's and nvtiff's are empty), the
# last one pip writes stays, and an empty one hides every other nvidia/ folder on sys.path:
# `nvidia.nccl` would not import. This file, copied over .venv's whatever pip's order, makes
# nvidia/ span every nvidia/ folder on sys.path, .venv's first.
__path__ = __import__("pkgutil").extend_path(__path__, __name__)
