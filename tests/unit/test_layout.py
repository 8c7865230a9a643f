"""House rules that keep the codebase honest: one horovod importer, no import circle,
no floor that imports a floor above it, a model registry docs/usage.md and the config follow."""
import ast
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
# the repository's folders of code and the module names they have: data/, kernels/ and bench/
# install as hvdtrain.data, hvdtrain.kernels and hvdtrain.bench (setup.py's package_dir)
NAMES = {"hvdtrain": "hvdtrain", "data": "hvdtrain.data", "kernels": "hvdtrain.kernels", "bench": "hvdtrain.bench",
         "launch": "launch", "gpucheck": "gpucheck"}
PACKAGES = tuple(NAMES)
# the layout is the pipeline: a floor imports its own room and the floors below it only
FLOOR = {"data": 0, "kernels": 0, "hvdtrain": 1, "bench": 2, "launch": 2, "gpucheck": 3}


def python_files(tops=PACKAGES):
    for top in tops:
        for dirpath, _, files in os.walk(os.path.join(ROOT, top)):
            for f in files:
                if f.endswith(".py"):
                    yield os.path.join(dirpath, f)


def module_of(path: str) -> str:
    rel = os.path.relpath(path, ROOT)[:-3].split(os.sep)
    mod = ".".join([NAMES[rel[0]]] + rel[1:])
    return mod[: -len(".__init__")] if mod.endswith(".__init__") else mod


def room_of(mod: str) -> str:
    """The folder a module name lives in."""
    for folder, name in sorted(NAMES.items(), key=lambda x: -len(x[1])):
        if mod == name or mod.startswith(name + "."):
            return folder
    raise KeyError(mod)


def imports_of(path: str) -> set[str]:
    """Project modules `path` imports anywhere (top level or inside a function)."""
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            # `from hvdtrain import dist` names a module; `from hvdtrain.x import f` names x
            names = [f"{node.module}.{a.name}" for a in node.names] + [node.module]
        else:
            continue
        out |= {n for n in names if n.split(".")[0] in ("hvdtrain", "launch", "gpucheck", "data", "kernels", "bench")}
    return out


def graph() -> dict[str, set[str]]:
    mods = {module_of(p): p for p in python_files()}
    g = {}
    for mod, path in mods.items():
        g[mod] = {n for n in imports_of(path) if n in mods and n != mod and n != mod.split(".")[0]}
    return g


def test_code_imports_data_kernels_and_bench_through_the_hvdtrain_namespace():
    """Installed, the repository's data/, kernels/ and bench/ are hvdtrain.data, ... : a bare
    `import data` would take the user's own `data` package, or none."""
    bad = sorted(f"{os.path.relpath(p, ROOT)}: {n}" for p in python_files(PACKAGES + ("tests", "examples"))
                 for n in imports_of(p) if n.split(".")[0] in ("data", "kernels", "bench"))
    assert not bad, bad


def test_only_dist_imports_horovod():
    """The library's one horovod importer is hvdtrain/dist.py; examples/ import it as a
    user's script would."""
    pattern = re.compile(r"^\s*(import horovod|from horovod)", re.M)
    importers = sorted(os.path.relpath(p, ROOT) for p in python_files(PACKAGES + ("examples",))
                       if pattern.search(open(p).read()))
    assert [x for x in importers if not x.startswith("examples/")] == ["hvdtrain/dist.py"]


def test_the_import_graph_has_no_circle():
    g = graph()
    state, stack = {}, []

    def visit(m):
        state[m] = "open"
        stack.append(m)
        for n in sorted(g[m]):
            if state.get(n) == "open":
                raise AssertionError("import circle: " + " -> ".join(stack[stack.index(n):] + [n]))
            if n not in state:
                visit(n)
        stack.pop()
        state[m] = "done"
    for m in sorted(g):
        if m not in state:
            visit(m)


def test_no_floor_imports_a_floor_above_it():
    """data/ and kernels/ import nothing of hvdtrain's above them; hvdtrain/ imports neither
    bench/ nor launch/ (the trainer does not depend on its own benchmark or launchers)."""
    bad = [f"{m} imports {n}" for m, deps in graph().items() for n in deps
           if room_of(n) != room_of(m) and FLOOR[room_of(n)] >= FLOOR[room_of(m)]]
    assert not bad, bad


def test_entry_points_document_their_command():
    for mod in ("hvdtrain/sanity.py", "hvdtrain/train.py", "hvdtrain/evaluate.py", "hvdtrain/export.py",
                "hvdtrain/synthetic.py", "bench/loader.py", "bench/throughput.py", "bench/tune.py", "data/synth.py",
                "data/make_shards.py"):
        doc = open(os.path.join(ROOT, mod)).read().split('"""')[1]
        assert "python -m" in doc, f"{mod}: docstring should show its command line"


def test_usage_model_table_is_the_registry():
    from hvdtrain import model as M

    assert M.readme_table() in open(os.path.join(ROOT, "docs", "usage.md")).read(), \
        "docs/usage.md's model table differs from `python -m hvdtrain.model`: paste its output"


def test_exit_codes_have_one_table():
    """hvdtrain/exits.py is the table of exit codes; the modules that end a run name its
    constants instead of writing (or describing) the numbers again."""
    from hvdtrain import exits

    assert (exits.OK, exits.FAILED, exits.REFUSED, exits.STALLED, exits.PREEMPTED) == (0, 1, 2, 3, 4)
    assert sorted(exits.MEANING) == [0, 1, 2, 3, 4] and all(exits.MEANING.values())
    numbers = re.compile(r"\bexits? [1-4]\b|\bExit codes: [0-4]|os\._exit\([1-4]\)|SystemExit\([0-4]\)|return [0-4]$",
                         re.M)
    found = [f"{mod}: {m.group()}" for mod in ("session", "watchdog", "preempt", "sanity", "train", "evaluate",
                                                "export", "dist", "elastic", "resume")
             for m in numbers.finditer(open(os.path.join(ROOT, "hvdtrain", f"{mod}.py")).read())]
    assert not found, found
