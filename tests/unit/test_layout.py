"""House rules that keep the codebase honest."""
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def python_files():
    for top in ("hvdtrain", "data", "bench", "launch", "kernels"):
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def test_only_dist_imports_horovod():
    pattern = re.compile(r"^\s*(import horovod|from horovod)", re.M)
    importers = sorted(os.path.relpath(p, ROOT) for p in python_files() if pattern.search(open(p).read()))
    assert importers == ["hvdtrain/dist.py"]


def test_entry_points_document_their_command():
    for mod in ("hvdtrain/sanity.py", "hvdtrain/train.py", "bench/loader.py", "data/synth.py",
                "data/make_shards.py"):
        doc = open(os.path.join(ROOT, mod)).read().split('"""')[1]
        assert "python -m" in doc, f"{mod}: docstring should show its command line"
