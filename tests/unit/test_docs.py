"""The README and docs/ point at things that exist: every relative link resolves (the file,
and the heading where a #anchor is given), every `make TARGET` is a rule of the Makefile,
and every `python -m MODULE` names a module that can be found, without importing it."""
import glob
import importlib.machinery
import os
import re
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCS = ["README.md"] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "docs", "*.md")))
# installed as hvdtrain.data / hvdtrain.bench / hvdtrain.kernels, real folders in the checkout
NAMESPACED = ("data", "bench", "kernels")

FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`(?:[^`\n]|\n(?!\s*\n))+`")  # a code span may wrap, not cross a blank line
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)
MAKE = re.compile(r"(?:^|[\s`$;&|(])make\s+((?:\S+=\S+\s+)*)([A-Za-z][\w.-]*)")
PYTHON_M = re.compile(r"python3?\s+-m\s+([A-Za-z_][\w.]*)")


def read(doc: str) -> str:
    with open(os.path.join(ROOT, doc), encoding="utf-8") as f:
        return f.read()


def prose(text: str) -> str:
    """The text without code: links inside code blocks or spans are not links."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def code(text: str) -> str:
    """Only the code: fenced blocks and inline spans, where commands are written."""
    return "\n".join([m.group(0) for m in FENCE.finditer(text)] + INLINE_CODE.findall(FENCE.sub("", text)))


def anchor(heading: str) -> str:
    """GitHub's anchor of a heading: its text (a link keeps its words) lower-cased, every
    character but letters, digits, '_', '-' and spaces dropped, spaces to '-'."""
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", heading).lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(doc: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for h in HEADING.findall(FENCE.sub("", read(doc))):
        a = anchor(h)
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def links(doc: str) -> list[str]:
    return [u for u in LINK.findall(prose(read(doc))) if not re.match(r"[a-z][a-z0-9+.-]*:", u)]


def make_targets() -> set[str]:
    targets = set()
    for line in read("Makefile").splitlines():
        m = re.match(r"^([A-Za-z0-9_.%-][A-Za-z0-9_.% -]*?)\s*::?(?!=)", line)
        if m and not line.startswith("\t"):
            targets |= {t for t in m.group(1).split() if not t.startswith(".")}
    return targets


def find_module(name: str):
    """The spec of `name` as `python -m name` would find it from the repository root,
    found without running any module's code (a parent package is looked up, not imported)."""
    parts = name.split(".")
    if parts[0] == "hvdtrain" and len(parts) > 1 and parts[1] in NAMESPACED:
        parts = parts[1:]
    spec = importlib.machinery.PathFinder.find_spec(parts[0], [ROOT] + sys.path)
    for i in range(1, len(parts)):
        if spec is None or not spec.submodule_search_locations:
            return None
        spec = importlib.machinery.PathFinder.find_spec(".".join(parts[: i + 1]), spec.submodule_search_locations)
    return spec


def test_there_are_docs_to_check():
    assert "docs/architecture.md" in DOCS and len(DOCS) >= 5, DOCS


@pytest.mark.parametrize("doc", DOCS)
def test_every_relative_link_resolves(doc):
    here = os.path.dirname(os.path.join(ROOT, doc))
    bad = []
    for url in links(doc):
        path, _, frag = url.partition("#")
        target = os.path.normpath(os.path.join(here, path)) if path else os.path.join(ROOT, doc)
        if not os.path.exists(target):
            bad.append(f"{url}: no such file {os.path.relpath(target, ROOT)}")
        elif frag and target.endswith(".md") and frag not in anchors(os.path.relpath(target, ROOT)):
            bad.append(f"{url}: no heading #{frag} in {os.path.relpath(target, ROOT)}")
    assert not bad, f"{doc}: broken links:\n" + "\n".join(bad)


@pytest.mark.parametrize("doc", DOCS)
def test_every_make_target_named_exists(doc):
    targets = make_targets()
    named = {m.group(2) for m in MAKE.finditer(code(read(doc)))}
    assert not named - targets, f"{doc}: make target(s) {sorted(named - targets)} not in the Makefile {sorted(targets)}"


@pytest.mark.parametrize("doc", DOCS)
def test_every_python_m_module_named_exists(doc):
    named = set(PYTHON_M.findall(code(read(doc))))
    missing = sorted(n for n in named if find_module(n) is None)
    assert not missing, f"{doc}: `python -m` names module(s) that cannot be found: {missing}"


def test_the_checks_catch_what_they_should():
    """The helpers themselves: GitHub's anchors, the Makefile's rules, a module that is
    not there, and a link that is broken."""
    assert anchor("Elastic across nodes: what it takes, and why (Horovod 0.28.1, Slurm 22.05)") == \
        "elastic-across-nodes-what-it-takes-and-why-horovod-0281-slurm-2205"
    assert anchor("Training: `python -m hvdtrain.train`") == "training-python--m-hvdtraintrain"
    assert anchor("Exit codes") == "exit-codes"
    assert {"setup", "sanity", "test", "gpu-check"} <= make_targets()
    assert find_module("data.make_shards") and find_module("hvdtrain.data.make_shards")
    assert find_module("hvdtrain.sanity") and find_module("gpucheck") and find_module("pytest")
    assert find_module("data.no_such_module") is None and find_module("hvdtrain.nothing") is None
    assert [m.group(2) for m in MAKE.finditer('make setup EXTRAS="x"\n$ make sanity\n')] == ["setup", "sanity"]
    assert links("README.md"), "the README links to docs/"
    assert "docs/x.md" in LINK.findall(prose("see [x](docs/x.md) and `[y](not/a/link.md)`"))
