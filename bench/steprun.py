"""Runs a plan of commands, each bounded by a timeout, and judges the figures each one
writes in its JSON output against targets. The plan itself lives in bench/gpu_check.py.

A step's figures are read from what the command writes for programs: the last
`BENCH_JSON {...}` line of its output, a JSON report file, or pytest's JUnit XML; never
from prose. Each figure is PASS, FAIL, REPORTED (no target) or NOT EVALUATED (why).
A step that times out has its whole process tree killed (horovodrun starts each rank
in a session of its own, so a process-group kill is not enough: see kill_tree).
"""
from __future__ import annotations

import json
import operator
import os
import re
import shlex
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from typing import Any, Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = {">=": operator.ge, "<=": operator.le, "==": operator.eq}


@dataclass(frozen=True)
class Figure:
    key: str                       # report key, unit in the name (loader_224_dali_gpu_img_s)
    label: str
    read: Callable[[dict], Any]    # the step's output document -> value (None: not measured)
    op: str | None = None          # >=, <=, == ; None: reported beside a reference, no target
    target: Any = None             # a value, or target(ctx) -> value | None (None: reported)
    reference: str = ""            # shown beside a reported figure (e.g. a published rate)
    why: Callable[[dict], str] | None = None  # the output's own reason when it has no value


@dataclass(frozen=True)
class Step:
    name: str
    argv: tuple[str, ...]          # templated: {py} {horovodrun} {gpus} {dir}
    timeout_s: int
    output: str                    # bench_json | json:<path under {dir}> | junit:<path under {dir}> | none
    figures: tuple[Figure, ...] = ()
    env: dict[str, str] = field(default_factory=dict)
    dry: str = "parse"             # how --dry-run checks the command: parse | collect (pytest)


PLACEHOLDER = re.compile(r"\{(py|horovodrun|gpus|dir)\}")


def fill(text: str, ctx: dict) -> str:
    """The plan's placeholders only: other braces (a `python -c` program) stay as they are."""
    return PLACEHOLDER.sub(lambda m: str(ctx[m.group(1)]), text)


def expand(argv: tuple[str, ...], ctx: dict) -> list[str]:
    return [fill(a, ctx) for a in argv]


def kill_tree(pid: int) -> None:
    """SIGKILL a launcher and every process below it at once (frozen first, so no rank
    reacts to another's death), then its process group."""
    import psutil

    try:
        procs = [psutil.Process(pid)]
        procs += procs[0].children(recursive=True)
    except psutil.NoSuchProcess:
        return
    for sig in (signal.SIGSTOP, signal.SIGKILL):
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def run_command(argv: list[str], timeout_s: float, log_path: str, env: dict | None = None) -> tuple[int | None, float]:
    """(exit status or None on timeout, seconds). Output goes to `log_path`."""
    t0 = time.monotonic()
    with open(log_path, "w") as log:
        log.write("$ " + shlex.join(argv) + "\n")
        log.flush()
        p = subprocess.Popen(argv, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                             start_new_session=True, env=env)
        try:
            rc = p.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(p.pid)
            p.wait()
            rc = None
    return rc, time.monotonic() - t0


def read_output(step: Step, ctx: dict, log_path: str) -> tuple[dict | None, str]:
    """The step's output document, or (None, why)."""
    kind, _, rel = step.output.partition(":")
    if kind == "none":
        return {}, ""
    if kind == "bench_json":
        lines = [ln for ln in open(log_path, errors="replace") if "BENCH_JSON " in ln]
        if not lines:
            return None, "no BENCH_JSON line in its output"
        return json.loads(lines[-1].split("BENCH_JSON ", 1)[1]), ""
    path = fill(rel, ctx)
    if not os.path.exists(path):
        return None, f"{path} was not written"
    if kind == "json":
        with open(path) as f:
            return json.load(f), ""
    suites = ET.parse(path).getroot()
    suites = [suites] if suites.tag == "testsuite" else list(suites)
    counts = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    return counts, ""


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


def run_step(step: Step, ctx: dict, run_dir: str) -> dict:
    """Run one step and judge its figures; every step also has an exit-status figure."""
    argv = expand(step.argv, ctx)
    log = os.path.join(run_dir, f"{step.name}.log")
    env = {**os.environ, **step.env}
    print(f"gpu_check: [{step.name}] {shlex.join(argv)}  (timeout {step.timeout_s} s)", flush=True)
    rc, wall_s = run_command(argv, step.timeout_s, log, env)
    exit_fig = {"key": f"{step.name}.exit", "label": "exit status", "op": "==", "target": 0, "value": rc,
                "reference": None, "status": "PASS" if rc == 0 else "FAIL",
                "why": f"timed out after {step.timeout_s} s: the process tree was killed" if rc is None else ""}
    try:
        doc, why = read_output(step, ctx, log)
    except (OSError, ValueError, ET.ParseError) as e:
        doc, why = None, f"its output could not be read: {e}"
    if rc is None:
        doc, why = None, f"the step timed out after {step.timeout_s} s"
    figs = [exit_fig] + [judge(f, doc, why, ctx) for f in step.figures]
    failed = [f["key"] for f in figs if f["status"] in ("FAIL", "NOT EVALUATED") and f["op"]]
    print(f"gpu_check: [{step.name}] {'FAIL' if failed else 'PASS'} in {wall_s:.0f} s"
          + (f": {', '.join(failed)}" if failed else "") + f"  (log: {log})", flush=True)
    return {"name": step.name, "argv": argv, "timeout_s": step.timeout_s, "wall_s": round(wall_s, 1),
            "exit": rc, "timed_out": rc is None, "log": log, "figures": figs, "passed": not failed}


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


def dry_check(step: Step, ctx: dict, scratch: str) -> list[str]:
    """Problems with a step's command, found without a GPU: missing executables, files,
    modules, and flags its parsers reject. [] = it parses."""
    argv = expand(step.argv, ctx)
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
    if step.dry == "collect":
        cmds.append(argv + ["--collect-only", "-q", "-p", "no:cacheprovider"])
    else:
        import importlib.util

        if importlib.util.find_spec(mod) is None:
            return [f"module {mod} not found"]
        cmds.append([argv[0], "-c", PARSE_ONLY, mod, *flags])
    for i, cmd in enumerate(cmds):
        log = os.path.join(scratch, f"{step.name}-dry{i}.log")
        rc, _ = run_command(cmd, 120, log, env)
        if rc != 0:
            tail = [ln.strip() for ln in open(log, errors="replace").read().strip().splitlines()[-2:]]
            problems.append(f"`{shlex.join(cmd if cmd[1] != '-c' else [cmd[0], '-m', mod, *flags])}` "
                            f"exited {rc}: " + " | ".join(tail))
    return problems


