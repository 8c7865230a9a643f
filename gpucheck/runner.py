"""Runs a plan of stages, each one command bounded by a timeout, and judges the figures
each command writes against their targets. The plan itself (the commands, targets and
timeouts) lives in gpucheck/plan.py; gpucheck/check.py runs it and writes the report.

A stage's figures are read from what the command writes for programs: the last
`BENCH_JSON {...}` line of its output, a JSON report file, or pytest's JUnit XML (one file,
or one per rank: a glob); never from prose. One kind of stage is judged on how it ended: a
command that must refuse at once (`refusal`, a pattern its message must match: a rank
more than the GPUs) is read for its exit status, seconds and the refusal's line
(`output="ended"`).
Each figure is PASS, FAIL, REPORTED (no target) or NOT EVALUATED (why).

A stage that runs into its timeout first gets SIGINT, `grace_s` before the timeout, so it
can end on what it has (pytest then writes its JUnit XML with the tests that ran,
bench.loader prints its table and BENCH_JSON for the settings it measured); whatever is
still running at the timeout has its whole process tree killed (horovodrun starts each
rank in a session of its own, so a process-group kill is not enough: see kill_tree).
Figures read from what a timed-out stage wrote are kept; the stage still fails.

A crash at exit (DALI's abort at interpreter shutdown with CUDA, NVIDIA/DALI#6166) does
not undo a run that finished: a command that prints `EXIT_STATUS 0` as its last act
(`hvdtrain.exitmark.mark`, on when HVDTRAIN_EXIT_MARK=1, which run_stage sets) on
every process it is expected to (`exit_marks`), and then exits with another status,
passes its exit figure with the crash named.
"""
from __future__ import annotations

import glob
import json
import operator
import os
import re
import shlex
import signal
import subprocess
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable

from hvdtrain.exitmark import EXIT_MARK
from hvdtrain.procs import kill_tree, process_tree  # noqa: F401 (process_tree: for readers)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}
# A skip whose reason starts with this is expected on some machines (one GPU: no other
# device order to test) and does not fail the stage; any other skip does.
EXPECTED_SKIP = "expected on this machine:"


@dataclass(frozen=True)
class Figure:
    key: str                       # report key, unit in the name (loader_224_dali_gpu_img_s)
    label: str
    read: Callable[[dict], Any]    # the stage's output document -> value (None: not measured)
    op: str | None = None          # >=, <=, == ; None: reported beside a reference, no target
    target: Any = None             # a value, or target(ctx) -> value | None (None: reported)
    reference: str = ""            # shown beside a reported figure (e.g. a published rate)
    why: Callable[[dict], str] | None = None  # the output's own reason when it has no value


@dataclass(frozen=True)
class Stage:
    """One command of the check: what it runs, how long it may take, and where its
    figures are read from."""
    name: str                      # what --only takes (sanity, loader-224, ...)
    argv: tuple[str, ...]          # templated: {py} {horovodrun} {gpus} {gpus+1} {dir}
    timeout_s: int
    output: str                    # bench_json | json:<path> | junit:<path or glob> | ended | none (paths under {dir})
    figures: tuple[Figure, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    dry: str = "parse"             # how --dry-run checks the command: parse | collect (pytest)
    cost: str = ""                 # what the timeout is sized from (measured or reasoned), shown in the plan
    grace_s: int = 10              # SIGINT this long before the timeout (at most a quarter of it), then the kill
    exit_marks: str = ""           # EXIT_STATUS lines a clean finish prints ("1", "{gpus}"); "" = none
    refusal: str = ""              # a regex: a non-zero exit whose output matches it is a clean refusal


PLACEHOLDER = re.compile(r"\{(py|horovodrun|gpus|gpus\+1|dir)\}")


def fill(text: str, ctx: dict) -> str:
    """The plan's placeholders only ({gpus+1}: one rank more than the GPUs); other braces
    (a `python -c` program) stay as they are."""
    return PLACEHOLDER.sub(lambda m: str(int(ctx["gpus"]) + 1) if m.group(1) == "gpus+1" else str(ctx[m.group(1)]),
                           text)


def expand(argv: tuple[str, ...], ctx: dict) -> list[str]:
    return [fill(a, ctx) for a in argv]


def _default_sigint() -> None:
    """In the child, before exec: SIGINT back to its default. A parent started in the
    background of a non-interactive shell has it ignored, and an ignored SIGINT is
    inherited (Python then installs no KeyboardInterrupt handler): the interrupt would do
    nothing and every stage that timed out would lose its results to the kill."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def run_command(argv: list[str], timeout_s: float, log_path: str, env: dict | None = None,
                grace_s: float = 0) -> tuple[int | None, float, str]:
    """(exit status or None on timeout, seconds, how a timed-out command ended: "" |
    "SIGINT" (it exited within the grace) | "SIGKILL"). Output goes to `log_path`. With
    `grace_s`, the command's process group gets SIGINT at timeout_s - grace_s; whatever
    of its tree is left at timeout_s is killed."""
    t0 = time.monotonic()
    grace_s = min(grace_s, timeout_s / 4)
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(argv) + "\n")
        log.flush()
        p = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env, preexec_fn=_default_sigint)
        try:
            return p.wait(timeout=timeout_s - grace_s), time.monotonic() - t0, ""
        except subprocess.TimeoutExpired:
            pass
        procs, how = process_tree(p.pid), "SIGKILL"
        if grace_s > 0:
            try:
                os.killpg(p.pid, signal.SIGINT)
                p.wait(timeout=grace_s)
                how = "SIGINT"
            except (ProcessLookupError, PermissionError):
                how = "SIGINT"
            except subprocess.TimeoutExpired:
                pass
        kill_tree(p.pid, procs)  # what the interrupt left running (horovodrun's ranks, a child ignoring it)
        p.wait()
    return None, time.monotonic() - t0, how


def read_output(stage: Stage, ctx: dict, log_path: str, ended: dict | None = None) -> tuple[dict | None, str]:
    """The stage's output document, or (None, why). `ended`: how it ended (exit, wall_s,
    refused), the document of an `ended` stage."""
    kind, _, rel = stage.output.partition(":")
    if kind == "none":
        return {}, ""
    if kind == "ended":
        return dict(ended or {}), ""
    if kind == "bench_json":
        lines = [ln for ln in open(log_path, errors="replace") if "BENCH_JSON " in ln]
        if not lines:
            return None, "no BENCH_JSON line in its output"
        return json.loads(lines[-1].split("BENCH_JSON ", 1)[1]), ""
    path = fill(rel, ctx)
    if kind == "junit" and glob.has_magic(path):  # one file per rank (tests/parallel/conftest.py)
        paths = sorted(glob.glob(path))
        return (read_junits(paths), "") if paths else (None, f"no file matching {path} was written")
    if not os.path.exists(path):
        return None, f"{path} was not written"
    if kind == "json":
        with open(path) as f:
            return json.load(f), ""
    return read_junit(path), ""


def read_junits(paths: list[str]) -> dict:
    """Several ranks' JUnit XML as one: counts summed, each listed test named with its
    file (`parallel-tests.rank1.xml: test: reason`); `files` says how many there were."""
    out: dict = {"files": len(paths)}
    for path in paths:
        one = read_junit(path)
        tag = os.path.basename(path)
        for k, v in one.items():
            out[k] = out.get(k, [] if isinstance(v, list) else 0) + \
                ([f"{tag}: {x}" for x in v] if isinstance(v, list) else v)
    return out


def read_junit(path: str) -> dict:
    """pytest's JUnit XML -> counts (tests, failures, errors, skipped, passed), the skips
    split into `expected_skips` (reason starts with EXPECTED_SKIP) and `unexpected_skips`,
    each a list of "test: reason", and `not_passed`: "test: message" per failure or error."""
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root)
    counts: dict = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    counts.update(expected_skips=[], unexpected_skips=[], not_passed=[])
    for case in (c for s in suites for c in s.iter("testcase") if c.get("name")):
        name = f"{case.get('classname', '')}::{case.get('name')}"
        for kind in ("skipped", "failure", "error"):
            el = case.find(kind)
            if el is None:
                continue
            why = (el.get("message") or "").strip()
            if kind != "skipped":
                counts["not_passed"].append(f"{name}: {why[:200]}")
            elif why.startswith(EXPECTED_SKIP):
                counts["expected_skips"].append(f"{name}: {why}")
            else:
                counts["unexpected_skips"].append(f"{name}: {why}")
    return counts


def judge(fig: Figure, doc: dict | None, why: str, ctx: dict) -> dict:
    out = {"key": fig.key, "label": fig.label, "op": fig.op, "target": None, "value": None,
           "reference": fig.reference or None}
    target = fig.target(ctx) if callable(fig.target) else fig.target
    out["target"] = target if fig.op else None
    if doc is not None:
        try:
            out["value"] = fig.read(doc)
        except (KeyError, IndexError, TypeError, ValueError, StopIteration) as e:
            why = f"not in the output ({e.__class__.__name__}: {e})"
    if out["value"] is None and doc is not None and fig.why is not None and not why:
        try:
            why = fig.why(doc) or ""
        except (KeyError, IndexError, TypeError, ValueError, StopIteration):
            why = ""
    if out["value"] is None:
        out.update(status="NOT EVALUATED", why=why or "not measured (the output has no value)")
    elif fig.op is None or target is None:
        out.update(status="REPORTED", why="" if fig.op is None else "no target for this GPU")
    else:
        ok = OPS[fig.op](out["value"], target)
        out.update(status="PASS" if ok else "FAIL", why="")
    return out


def exit_marks(log_path: str) -> list[int]:
    """The statuses the command's processes reported with EXIT_STATUS lines, in order."""
    out = []
    with open(log_path, errors="replace") as f:
        for line in f:
            if EXIT_MARK in line:
                word = line.split(EXIT_MARK, 1)[1].split()
                if word and word[0].lstrip("-").isdigit():
                    out.append(int(word[0]))
    return out


def describe_status(rc: int) -> str:
    """An exit status in words: a negative one is the signal that ended the process."""
    if rc < 0:
        try:
            return f"killed by {signal.Signals(-rc).name}"
        except ValueError:
            return f"killed by signal {-rc}"
    if rc > 128:  # a launcher or shell reporting a child's signal as 128 + n
        try:
            return f"exit status {rc} ({signal.Signals(rc - 128).name})"
        except ValueError:
            pass
    return f"exit status {rc}"


def crash_at_exit(stage: Stage, ctx: dict, rc: int | None, log_path: str) -> str:
    """Non-empty (the crash, named) when the command crashed after every one of its
    processes reported a clean finish: its results stand."""
    if rc in (0, None) or not stage.exit_marks:
        return ""
    want, marks = int(fill(stage.exit_marks, ctx)), exit_marks(log_path)
    if len(marks) < want or any(marks):
        return ""
    with open(log_path, errors="replace") as f:
        lines = f.read().splitlines()
    last = max(i for i, ln in enumerate(lines) if EXIT_MARK in ln)
    after = [ln.strip() for ln in lines[last + 1:] if ln.strip()]
    said = f"; after it: {' | '.join(after[-3:])[:300]}" if after else ""
    return f"crashed at exit ({describe_status(rc)}) after {len(marks)} process(es) reported EXIT_STATUS 0{said}"


def refusal_line(stage: Stage, rc: int | None, log_path: str) -> str:
    """The line of the output matching `stage.refusal` when the command refused as it
    should (a non-zero exit of its own, not a timeout); "" otherwise."""
    if not stage.refusal or rc in (0, None):
        return ""
    pattern = re.compile(stage.refusal)
    with open(log_path, errors="replace") as f:
        return next((ln.strip()[:400] for ln in f if pattern.search(ln)), "")


def exit_figure(stage: Stage, rc: int | None, how: str, crash: str) -> dict:
    fig = {"key": f"{stage.name}.exit", "label": "exit status", "op": "==", "target": 0, "value": rc,
           "reference": None, "status": "PASS" if rc == 0 or crash else "FAIL", "why": crash}
    if rc is None:
        fig["why"] = (f"timed out after {stage.timeout_s} s: "
                      + ("it ended on SIGINT; what it wrote is kept" if how == "SIGINT" else
                         "the process tree was killed" + (" (SIGINT did not end it)" if stage.grace_s else "")))
    return fig


def run_stage(stage: Stage, ctx: dict, run_dir: str) -> dict:
    """Run one stage and judge its figures; every stage also has an exit-status figure."""
    argv = expand(stage.argv, ctx)
    log = os.path.join(run_dir, f"{stage.name}.log")
    env = {**os.environ, **stage.env, **({"HVDTRAIN_EXIT_MARK": "1"} if stage.exit_marks else {})}
    print(f"gpu_check: [{stage.name}] {shlex.join(argv)}  (timeout {stage.timeout_s} s)", flush=True)
    kind, _, rel = stage.output.partition(":")
    if kind in ("json", "junit"):  # an earlier run's report in a reused run folder is not this one's
        for stale in glob.glob(fill(rel, ctx)):
            os.remove(stale)
    rc, wall_s, how = run_command(argv, stage.timeout_s, log, env, stage.grace_s)
    crash, line = crash_at_exit(stage, ctx, rc, log), refusal_line(stage, rc, log)
    refusal = f"refused as designed ({describe_status(rc)}): {line}" if line else ""
    try:
        doc, why = read_output(stage, ctx, log, {"exit": rc, "wall_s": round(wall_s, 1), "refused": line})
    except (OSError, ValueError, ET.ParseError) as e:
        doc, why = None, f"its output could not be read: {e}"
    if rc is None and doc is None:
        why = f"the stage timed out after {stage.timeout_s} s ({how}) and left no output: {why}"
    figs = [exit_figure(stage, rc, how, crash or refusal)] + [judge(f, doc, why, ctx) for f in stage.figures]
    failed = [f["key"] for f in figs if f["status"] in ("FAIL", "NOT EVALUATED") and f["op"]]
    print(f"gpu_check: [{stage.name}] {'FAIL' if failed else 'PASS'} in {wall_s:.0f} s"
          + (f": {', '.join(failed)}" if failed else "") + (f" ({crash or refusal})" if crash or refusal else "")
          + f"  (log: {log})", flush=True)
    return {"name": stage.name, "argv": argv, "timeout_s": stage.timeout_s, "wall_s": round(wall_s, 1),
            "exit": rc, "timed_out": rc is None, "ended_by": how or None, "crash_at_exit": crash or None,
            "refused": refusal or None,
            "log": log, "figures": figs, "passed": not failed, "cost": stage.cost}


# ---------------------------------------------------------------- the dry run
# Runs a module's own argument parser on the plan's flags, then stops before any work:
# argparse's parse_args and hvdtrain.config.parse_args (the config tree's) are wrapped.
PARSE_ONLY = r"""
import argparse, runpy, sys
mod, argv = sys.argv[1], sys.argv[2:]
def stop(_):
    print("parsed:", mod, flush=True)
    raise SystemExit(0)
_argparse = argparse.ArgumentParser.parse_args
argparse.ArgumentParser.parse_args = lambda self, args=None, namespace=None: stop(_argparse(self, args, namespace))
try:
    from hvdtrain import config as _config
    _cfg = _config.parse_args
    _config.parse_args = lambda *a, **k: stop(_cfg(*a, **k))
except ImportError:
    pass
sys.argv = [mod] + argv
runpy.run_module(mod, run_name="__main__", alter_sys=True)
print(mod + " finished without parsing its arguments", file=sys.stderr)
sys.exit(3)
"""


def dry_check(stage: Stage, ctx: dict, scratch: str) -> list[str]:
    """Problems with a stage's command, found without a GPU: missing executables, files,
    modules, and flags its parsers reject. [] = it parses."""
    argv = expand(stage.argv, ctx)
    problems = [f"{a}: no such file" for a in argv if os.sep in a and not a.startswith(ctx["dir"])
                and not a.startswith("-") and not os.path.exists(a)]
    if problems:
        return problems
    cmds = []
    if os.path.basename(argv[0]) == "horovodrun":  # its flags through its own parser, then the rank command
        k = argv.index(ctx["py"])
        cmds.append(argv[:k] + ["--check-build"])
        argv = argv[k:]
    mod_at = argv.index("-m") + 1
    mod, flags = argv[mod_at], argv[mod_at + 1:]
    env = {k: v for k, v in os.environ.items() if k != "HVDTRAIN_REQUIRE_GPU"}
    if stage.dry == "collect":
        cmds.append(argv + ["--collect-only", "-q", "-p", "no:cacheprovider"])
    else:
        import importlib.util

        if importlib.util.find_spec(mod) is None:
            return [f"module {mod} not found"]
        cmds.append([argv[0], "-c", PARSE_ONLY, mod, *flags])
    for i, cmd in enumerate(cmds):
        log = os.path.join(scratch, f"{stage.name}-dry{i}.log")
        rc, _, _ = run_command(cmd, 120, log, env)
        if rc != 0:
            tail = [ln.strip() for ln in open(log, errors="replace").read().strip().splitlines()[-2:]]
            problems.append(f"`{shlex.join(cmd if cmd[1] != '-c' else [cmd[0], '-m', mod, *flags])}` "
                            f"exited {rc}: " + " | ".join(tail))
    return problems


