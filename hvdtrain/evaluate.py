"""`python -m hvdtrain.evaluate`: a checkpoint's top-1, top-5, loss and images/s on a val
set, with the checkpoint's provenance (the code, config and data it was trained on).

    python -m hvdtrain.evaluate --checkpoint runs/tiny200 --data.val=shards/tiny/val [--json eval.json]
    horovodrun -np 2 -H localhost:2 python -m hvdtrain.evaluate --checkpoint runs/tiny200/ckpt-00000600.pt \
        --data.val=shards/tiny/val

`--checkpoint` takes a file, or a run folder: its `best.pt` (the lowest val loss), else
its newest `ckpt-*.pt`; the output says which and why. The model, task and input
pipeline come from the checkpoint's config; the data is opened as training opens it
(`session.open_data`: a folder, a .tar or a brace pattern) and read by the same val pass
(`hvdtrain.valpass`: every sample once across ranks, one allreduce), so on the run's
own val data the top-1 equals the run's final val top-1. Only the keys of how the data is
read and computed may be overridden (`--data.val`, `--data.val_batch_size`,
`--data.threads`, `--data.loader`, ..., `--train.torch_threads`). On a CPU-only machine
`--train.torch_threads=1` leaves DALI's thread a core of its own: on a 2-core machine,
1 rank, batches of 8 at 32 px: 256 img/s with the default 2 torch threads, 2,849 and 4,356
(two runs) with 1.

A checkpoint whose classes do not fit the data is refused (REFUSED), naming both: by
count (`_info.json`'s classes, or the labels of shards without one), and by name where
both the checkpoint and `_info.json` name them. Rank 0 prints a table, writes `--json
PATH` if given, and ends with one line `EVAL_JSON {...}`. Exit codes: `hvdtrain.exits`.
"""
from __future__ import annotations

import json
import sys
import time

from hvdtrain import checkpoint as ckpt
from hvdtrain import config as C
from hvdtrain import dist, exits, provenance, report, session
from hvdtrain import loader as L
from hvdtrain import model as M
from hvdtrain import step as S
from hvdtrain import task as TK
from hvdtrain import valpass as V
from hvdtrain.exits import Refused

# the config keys a user may change: where the data is and how it is read and computed, not what
# the model sees
KEYS = tuple(f"data.{k}" for k in ("val", "val_batch_size", "threads", "prefetch", "loader", "decode",
                                   "hw_decoder_load", "index_dir", "on_error")) + ("train.torch_threads",)


def parse(argv: list[str]) -> tuple[str, str, list[tuple[str, str]]]:
    """(checkpoint, json path, [(key, raw value)]) from `--checkpoint X --json Y --data.k=v`."""
    found: dict[str, str] = {}
    overrides = []
    it = iter(argv)
    for arg in it:
        if not arg.startswith("--"):
            raise C.ConfigError(f"unexpected argument {arg!r}")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            value = next(it, None)
            if value is None:
                raise C.ConfigError(f"--{key} needs a value")
        if key in ("checkpoint", "json"):
            found[key] = value
        elif key in KEYS:
            overrides.append((key, value))
        else:
            raise C.ConfigError(f"--{key}: hvdtrain.evaluate takes --checkpoint, --json and --{', --'.join(KEYS)}; "
                                f"the model, task and input size come from the checkpoint")
    if "checkpoint" not in found:
        raise C.ConfigError("--checkpoint FILE_OR_RUN_DIR is required")
    return found["checkpoint"], found.get("json", ""), overrides


def load_on_primary(path: str) -> tuple[dict | None, dict]:
    """Rank 0 reads the checkpoint; every rank gets what it says besides the weights
    (one broadcast). Returns (payload on rank 0 else None, meta)."""
    payload, meta = None, {"error": None}
    if dist.is_primary():
        try:
            file, why = ckpt.resolve(path)
            payload = ckpt.load(file)
            meta = {"error": None, "path": file, "why": why, "step": payload["step"], "config": payload["config"],
                    "num_classes": payload.get("num_classes"), "provenance": payload["provenance"],
                    "world_size": payload.get("world_size"), "saved_at": payload.get("saved_at")}
        except (ckpt.CheckpointError, KeyError) as e:
            meta = {"error": str(e) if not isinstance(e, KeyError) else f"checkpoint {path} lacks {e}"}
    meta = dist.broadcast_object(meta, name="eval_meta")
    if meta["error"]:
        raise Refused(meta["error"])
    return payload, meta


def eval_config(meta: dict, overrides: list[tuple[str, str]]) -> C.Config:
    """The checkpoint's config with the user's data keys on top (a synthetic run is
    evaluated on real data: its loader becomes DALI unless one is asked for)."""
    cfg = C.from_dict(meta["config"])
    cfg.data.train = ""
    if cfg.data.loader == "synthetic":
        cfg.data.loader = "dali"
    try:
        for key, raw in overrides:
            C.set_key(cfg, key, raw)
        C.validate(cfg)
    except C.ConfigError as e:
        raise Refused(str(e)) from None
    if not cfg.data.val:
        raise Refused("no data to evaluate on: pass --data.val=DIR (a folder of shards, a .tar or a brace pattern)")
    return cfg


def fit_classes(meta: dict, shards, task: str) -> None:
    """Refuse a head that does not fit the data, naming both; shards without _info.json fit
    when every label is below the head's size (their class count is then the head's)."""
    k, where = meta["num_classes"], f"checkpoint {meta['path']}"
    if not TK.get(task).needs_classes or not k:
        return
    n, info = shards.num_classes, shards.info_path
    if info is not None and n != k:
        raise Refused(f"{where} has a {k}-class head but the data {shards.spec} has {n} classes ({info})")
    if info is None and n and n > k:
        raise Refused(f"{where} has a {k}-class head but the data {shards.spec} has labels up to {n - 1}")
    names = meta["provenance"].get("classes")
    if names and shards.classes and names != shards.classes:
        diff = [(i, a, b) for i, (a, b) in enumerate(zip(names, shards.classes)) if a != b]
        raise Refused(f"{where} and the data {shards.spec} name their classes differently (first differences, "
                      f"index: checkpoint vs data: {diff[:3]}; {info}): the model was trained on another class list")
    shards.num_classes = k


def run(path: str, overrides: list[tuple[str, str]]) -> dict:
    """Every rank: load, check, build, one val pass. Returns the result (rank 0's to print)."""
    payload, meta = load_on_primary(path)
    cfg = eval_config(meta, overrides)
    opened = C.from_dict(C.to_dict(cfg))  # session.open_data opens a run's train split first: the val set is
    opened.data.train, opened.data.val, opened.data.num_classes = cfg.data.val, "", 0  # opened as that split
    shards, _, data = session.open_data(opened)
    fit_classes(meta, shards, cfg.train.task)
    _, dali_threads = S.configure_threads(cfg)
    task, device = TK.get(cfg.train.task), dist.device()
    model = M.build(cfg.model, task.head(meta["num_classes"])).to(device)
    if payload is not None:  # rank 0; broadcast_state hands its weights to every rank
        model.load_state_dict(payload["model"])
    dist.broadcast_state(model)
    val_batch = cfg.data.val_batch_size or cfg.train.batch_size
    state = S.TrainState(cfg, model, None, device, meta["num_classes"], amp=S.amp_dtype(cfg, device))
    val = L.from_config(cfg, shards, "val", dali_threads)
    dist.barrier()  # the clock starts on every rank together
    t0 = time.perf_counter()
    r = V.evaluate(state, val, lambda: S.autocast(state))
    seconds = time.perf_counter() - t0  # the pass ends in an allreduce: the slowest rank's time
    close = getattr(val, "close", None)
    if close is not None:
        close()
    trained, k = meta["provenance"], task.bound_k(meta["num_classes"], val_batch)
    warning = V.val_loss_problem(r["val_loss"], TK.val_bound(cfg.train.val_loss_bound, task, meta["num_classes"],
                                                             val_batch), cfg.train.val_loss_bound, k)
    return {"checkpoint": meta["path"], "chosen": meta["why"], "step": meta["step"], "task": cfg.train.task,
            "model": cfg.model.name, "num_classes": meta["num_classes"], "top1": r["val_top1"],
            "top5": r["val_top5"], "loss": r["val_loss"], "samples": r["val_samples"], "seconds": seconds,
            "images_per_s": r["val_samples"] / max(seconds, 1e-9), "ranks": dist.size(), "device": str(device),
            "loss_warning": warning, "data": data["train"], "loader": val.describe(),
            "trained": {"git_sha": trained.get("git_sha"), "git_dirty": trained.get("git_dirty"),
                        "config_hash": trained.get("config_hash"), "preset": cfg.preset,
                        "data_fingerprint": trained.get("data_fingerprint"),
                        "data_train": meta["config"]["data"]["train"],
                        "data_val": meta["config"]["data"]["val"], "ranks": meta["world_size"],
                        "saved_at": meta["saved_at"]},
            "code": provenance.code_state(), "versions": provenance.versions()}


def table(r: dict) -> str:
    t, d = r["trained"], r["data"]
    fps = t["data_fingerprint"] or {}
    same = [s for s, fp in fps.items() if fp == d["fingerprint"]]
    what = "retrieval " if r["task"] == "contrastive" else ""
    return "\n".join([
        f"hvdtrain.evaluate: {r['checkpoint']} ({r['chosen']}), step {r['step']}",
        f"  trained    code {t['git_sha']}{' (dirty)' if t['git_dirty'] else ''}, config {t['config_hash']} "
        f"(preset {t['preset']}, {r['task']}, {r['model']}), {t['ranks']} rank(s), saved {t['saved_at']}",
        f"  trained on " + "; ".join(f"{s}: {t['data_' + s] or '-'} (fingerprint {fp})" for s, fp in fps.items()),
        f"  evaluated  {r['data']['spec']}: {d['samples']} samples, fingerprint {d['fingerprint']}"
        + (f" (the run's own {' and '.join(same)} data)" if same else " (data the run neither trained nor validated on)"),
        f"  ranks      {r['ranks']} x {r['device']}, {r['loader']}, code {r['code']['git_sha']}",
        "",
        f"{'metric':<20} {'value':>10}",
        f"{what + 'top-1':<20} {r['top1']:>10.4f}",
        f"{what + 'top-5':<20} {r['top5']:>10.4f}",
        f"{'loss':<20} {r['loss']:>10.4f}",
        f"{'images/s':<20} {r['images_per_s']:>10.1f}   ({r['samples']} images in {r['seconds']:.2f} s, all ranks)",
    ] + ([f"warning: the loss {r['loss']:.4g} {r['loss_warning']}: wrong data or labels?"]
         if r["loss_warning"] else []))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        path, json_path, overrides = parse(argv)
    except C.ConfigError as e:
        print(f"hvdtrain.evaluate: {e}", file=sys.stderr)
        return exits.REFUSED
    dist.init()
    out: dict = {}
    code = session.guarded("hvdtrain.evaluate", lambda: out.update(run(path, overrides)) or exits.OK)
    if code:
        return code
    if dist.is_primary():
        print(table(out), flush=True)
        if json_path:
            report.write_json(json_path, out)
            print(f"json: {json_path}", flush=True)
        print("EVAL_JSON " + json.dumps(out, default=str), flush=True)
    dist.barrier()
    return exits.OK


if __name__ == "__main__":
    sys.exit(main())
