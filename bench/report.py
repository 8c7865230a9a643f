"""Where a bench writes: runs/<id>/bench-<name>.json, bench-<name>.md and a PNG chart,
then the console's last line `BENCH_JSON {...}` (versions, device, git SHA, config, error);
and `run_sections`, a bench made of sections that fail one at a time. Importing it
imports no torch (a bench that forks worker pools first imports it early)."""
from __future__ import annotations

import json
import os

from hvdtrain.data.files import write_atomic
from hvdtrain import provenance


def run_sections(sections: dict, skip=(), res: dict | None = None, after=None) -> dict:
    """`res[name] = fn()` for each of `sections` (name -> fn, in order) not in `skip`; one
    that raises is recorded in `res["errors"][name]` and the others still run. `after(name)`
    follows each (a progress line). Returns `res`."""
    res = {} if res is None else res
    for name, fn in sections.items():
        if name in skip:
            continue
        try:
            res[name] = fn()
        except Exception as e:  # noqa: BLE001 - one failed section is reported, the others still run
            res.setdefault("errors", {})[name] = f"{e.__class__.__name__}: {e}"[:2000]
        if after is not None:
            after(name)
    return res


def envelope(bench: str, config: dict, error: str | None, **payload) -> dict:
    import torch

    code = provenance.code_state()
    return {"bench": bench, **payload, "config": config, "versions": provenance.versions(),
            "git_sha": code["git_sha"], "git_dirty": code["git_dirty"], "cores": os.cpu_count(),
            "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
            "slurm": provenance.slurm_job(), "error": error}


def write(run_dir: str, name: str, result: dict, markdown: str, chart=None) -> str:
    """Write the JSON and Markdown (and, if `chart(plt)` is given, the PNG of the figure it
    returns: `hvdtrain.report.plot`), each atomically; returns run_dir."""
    from hvdtrain import report as R

    os.makedirs(run_dir, exist_ok=True)
    R.write_json(os.path.join(run_dir, f"bench-{name}.json"), result)
    png = R.plot(os.path.join(run_dir, f"bench-{name}.png"), chart) if chart is not None else None
    write_atomic(os.path.join(run_dir, f"bench-{name}.md"),
                 markdown + (f"\n\n![chart](bench-{name}.png)\n" if png else "\n"))
    return run_dir


def publish(run_dir: str, name: str, result: dict, table: str, chart=None, markdown: str | None = None) -> str:
    """Write the report files, print where they are, then the one last `BENCH_JSON` line.
    The Markdown body is `markdown` if given, else the console `table` in a code block."""
    body = markdown if markdown is not None else f"```\n{table}\n```"
    d = write(run_dir or default_dir(name), name, result, f"# bench.{name}\n\n{body}", chart)
    print(f"report: {d}/bench-{name}.md")
    print(last_line(result), flush=True)
    return d


def default_dir(name: str) -> str:
    return os.path.join("runs", provenance.run_id(f"bench-{name}"))


def last_line(result: dict) -> str:
    return "BENCH_JSON " + json.dumps(result, default=str)
