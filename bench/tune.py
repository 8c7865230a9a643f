"""`python -m bench.loader --tune`: pick the DALI loader's settings for this data and crop.

    python -m bench.loader --data DIR --size 224 --tune [--tune-seconds 60]

A coordinate search, one knob at a time, each trial a short timed run of the training's
own loader (`dali-gpu` where there is a GPU, else `dali-cpu`): DALI threads (1, 2, 4, ...
up to the cores this process may use), then the prefetch depth (1, 2, 4) at the best
thread count, then, on a GPU, `hw_decoder_load` (0, 0.65, 0.9, 0.99). The best trial
has the most images/s; of the trials within 3 % of it, the one that used the fewest
CPU cores wins. It
stops at `--tune-seconds` and says which trials it did not get to. Prints the trials,
the best as config overrides ready to paste (`--data.threads=... --data.prefetch=...`),
writes runs/<id>/bench-tune.{json,md} and ends with `BENCH_JSON {...}`.
"""
from __future__ import annotations

import os
import time

import torch

from hvdtrain.bench import report
from hvdtrain.bench.loader_runs import run_one

TIE = 0.03  # within 3 % of the best img/s, fewer CPU cores is better


def thread_counts(cores: int) -> list[int]:
    out, t = [], 1
    while t < cores:
        out.append(t)
        t *= 2
    return out + [cores]


def pick(trials: list[dict]) -> dict | None:
    """The best trial: of those within 3 % of the most images/s, the one using the fewest
    CPU cores (a tie in speed is won by the cheaper setting)."""
    ok = [t for t in trials if t.get("img_s")]
    if not ok:
        return None
    top = max(t["img_s"] for t in ok)
    return min((t for t in ok if t["img_s"] >= top * (1 - TIE)), key=lambda t: t["cpu_cores_used"])


def overrides(best: dict, gpu: bool) -> str:
    s = f"--data.threads={best['threads']} --data.prefetch={best['prefetch']}"
    return s + (f" --data.hw_decoder_load={best['hw_decoder_load']:g} --data.decode=mixed" if gpu else "")


def main(shards, a) -> int:
    gpu = torch.cuda.is_available()
    name = "dali-gpu" if gpu else "dali-cpu"
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:
        cores = os.cpu_count() or 1
    t0, trials, best, left = time.monotonic(), [], None, []
    hw0 = 0.99 if gpu else None
    stages = [("threads", thread_counts(cores)), ("prefetch", [1, 2, 4])]
    if gpu:
        stages.append(("hw_decoder_load", [0.0, 0.65, 0.9, 0.99]))
    for knob, values in stages:
        b = best or {"threads": 1, "prefetch": a.prefetch, "hw_decoder_load": hw0}  # vary one knob around the best
        base = {"threads": b["threads"], "prefetch": b["prefetch"], "hw_decoder_load": b["hw_decoder_load"]}
        plan = [(s["threads"], s["prefetch"], s["hw_decoder_load"]) for s in ({**base, knob: v} for v in values)]
        for threads, prefetch, hw in plan:
            if any((t["threads"], t["prefetch"], t["hw_decoder_load"]) == (threads, prefetch, hw) for t in trials):
                continue
            if time.monotonic() - t0 > a.tune_seconds:
                left.append({"threads": threads, "prefetch": prefetch, "hw_decoder_load": hw})
                continue
            r = run_one(name, shards, a, threads, hw, prefetch, windows=3)
            r.update(threads=threads, prefetch=prefetch, hw_decoder_load=hw, knob=knob)
            trials.append(r)
            ok = r.get("img_s") is not None
            print(f"tune: {knob:<15} threads {threads:>2} prefetch {prefetch} "
                  f"{'' if hw is None else f'hw {hw:<4g} '}-> "
                  + (f"{r['img_s']:8.1f} img/s, {r['cpu_cores_used']:.2f} cores" if ok
                     else r.get("error") or r.get("skipped")), flush=True)
            best = pick(trials)
    took = time.monotonic() - t0
    if best is None:
        print("tune: no trial produced a figure")
        return 1
    line = overrides(best, gpu)
    print(f"\nbest of {len(trials)} trial(s) in {took:.0f} s ({name}, crop {a.size}, batch {a.batch_size}): "
          f"{best['img_s']:.1f} img/s using {best['cpu_cores_used']:.2f} CPU cores "
          f"({best['img_s'] / max(best['cpu_cores_used'], 1e-9):.0f} img/s per core used)")
    if left:
        print(f"not tried (--tune-seconds {a.tune_seconds:g} spent): {len(left)} setting(s)")
    print(f"paste: {line}")
    result = report.envelope("tune", dict(vars(a)), None, loader=name, trials=trials, best=best, overrides=line,
                             not_tried=left, seconds=took)
    rows = "\n".join(f"| {t['knob']} | {t['threads']} | {t['prefetch']} | {t['hw_decoder_load'] or '-'} | "
                     f"{t.get('img_s') or '-'} | {t.get('cpu_cores_used') or '-'} |" for t in trials)
    report.publish(a.run_dir, "tune", result, "", None,
                   markdown=f"Best: `{line}` ({best['img_s']:.1f} img/s)\n\n| knob | threads | prefetch | hw load | "
                            f"img/s | cores used |\n|---|---|---|---|---|---|\n{rows}")
    return 0
