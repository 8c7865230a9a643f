"""The one definition of hvdtrain's service-level objectives (SLOs).

The GO/NO-GO (`hvdtrain.sanity`) owns them; the benches (`bench/`) import them from here.

Defaults: loader >= 300 img/s, loss reduction >= 0.15, sanity time <= 25 min, GPU
utilisation >= 85 %. Override any threshold with a JSON or TOML file:

    {"loader_img_s": 500, "gpu_util_pct": 90}

Each check is PASS, FAIL or NOT EVALUATED (value None: e.g. no GPU to measure), and the
JSON form `{name, threshold, value, passed}` carries `passed: null` for the last.
"""
from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass

OPS = {">=": operator.ge, "<=": operator.le}


@dataclass(frozen=True)
class SLO:
    name: str
    op: str          # ">=" or "<="
    threshold: float
    unit: str
    label: str


DEFAULTS = {
    "loader_img_s": SLO("loader_img_s", ">=", 300.0, "img/s", "loader throughput"),
    "loss_reduction": SLO("loss_reduction", ">=", 0.15, "", "loss reduction (first10 - last10)"),
    "sanity_time_min": SLO("sanity_time_min", "<=", 25.0, "min", "sanity wall time"),
    "gpu_util_pct": SLO("gpu_util_pct", ">=", 85.0, "%", "GPU utilisation (NVML mean)"),
}


def load(path: str | None = None) -> dict[str, SLO]:
    """The defaults, with thresholds from `path` (JSON or TOML) where it sets them."""
    slos = dict(DEFAULTS)
    if not path:
        return slos
    with open(path, "rb") as f:
        raw = f.read()
    if path.endswith(".toml"):
        import tomllib

        overrides = tomllib.loads(raw.decode())
    else:
        overrides = json.loads(raw)
    for name, value in overrides.items():
        if name not in slos:
            raise ValueError(f"{os.path.abspath(path)}: unknown SLO {name!r}; known: {sorted(slos)}")
        old = slos[name]
        slos[name] = SLO(old.name, old.op, float(value), old.unit, old.label)
    return slos


def check(slo: SLO, value: float | None, why_not: str = "") -> dict:
    passed = None if value is None else bool(OPS[slo.op](value, slo.threshold))
    out = {"name": slo.name, "threshold": slo.threshold, "op": slo.op, "value": value, "passed": passed}
    if value is None:
        out["not_evaluated"] = why_not or "no measurement"
    return out


def status(result: dict) -> str:
    return {True: "PASS", False: "FAIL", None: "NOT EVALUATED"}[result["passed"]]


def verdict(results: list[dict]) -> str:
    """GO when no evaluated SLO fails; a NOT EVALUATED check is shown, not counted."""
    return "NO-GO" if any(r["passed"] is False for r in results) else "GO"


def table(results: list[dict], slos: dict[str, SLO]) -> str:
    rows = [f"{'SLO':<38} {'target':>12} {'measured':>14}  result"]
    for r in results:
        s = slos[r["name"]]
        val = "-" if r["value"] is None else f"{r['value']:.4g} {s.unit}".strip()
        note = f" ({r['not_evaluated']})" if r["passed"] is None else ""
        rows.append(f"{s.label:<38} {s.op + ' ' + format(s.threshold, 'g') + ' ' + s.unit:>12} "
                    f"{val:>14}  {status(r)}{note}")
    return "\n".join(rows)
