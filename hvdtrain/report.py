"""Report writers: JSON, Markdown and PNG beside each other in the run folder (a run's live
logs are `hvdtrain.logs`)."""
from __future__ import annotations

import json
import os

from hvdtrain.data.files import write_atomic
from hvdtrain import slo as S
from hvdtrain import timing


def write_json(path: str, obj: dict) -> None:
    """`obj` as indented JSON (values JSON lacks as their str), written atomically."""
    write_atomic(path, json.dumps(obj, indent=1, default=str))


def plot(path: str, draw) -> str | None:
    """The one matplotlib set-up, for every PNG hvdtrain and its benches write: `draw(plt)`
    makes a figure with pyplot on the file-only Agg backend and returns it; it is laid out,
    written to `path` and closed. Returns `path`, or None (and no file) where matplotlib is
    missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig = draw(plt)
    try:
        fig.tight_layout()
        fig.savefig(path)
    finally:
        plt.close(fig)
    return path


def loss_plot(path: str, losses: list[float], title: str) -> str | None:
    """Loss per optimizer step as a PNG; None (and no file) if matplotlib is missing."""
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
        ax.plot(range(1, len(losses) + 1), losses, lw=1)
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("loss (mean over ranks)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
        return fig
    return plot(path, draw)


def util_plot(path: str, timeline: list[tuple[float, float]]) -> str | None:
    """The GPU utilisation timeline of the measured window as a PNG."""
    def draw(plt):
        fig, ax = plt.subplots(figsize=(6, 3), dpi=110)
        util_axes(ax, timeline)
        return fig
    return plot(path, draw)


def util_axes(ax, timeline: list[tuple[float, float]]) -> None:
    """GPU utilisation over the measured window (NVML samples), on a matplotlib axes."""
    ax.plot([t for t, _ in timeline], [u for _, u in timeline], lw=1)
    ax.set_ylim(0, 105)
    ax.set_xlabel("seconds into the measured window")
    ax.set_ylabel("GPU utilisation %")
    ax.grid(alpha=0.3)


def sanity_table(r: dict) -> str:
    mem = r["max_memory_gib"]
    gpu = r["gpu"]
    util = (f"{gpu['util_mean_pct']:.1f}% mean, p10 {gpu['util_p10_pct']:.1f}%, {gpu['samples']} samples"
            if gpu["evaluated"] else f"not evaluated: {gpu['why']}")
    dmon = gpu.get("dmon") or {}
    if dmon.get("evaluated"):
        util += f"; nvidia-smi dmon sm {dmon['sm_mean_pct']:.1f}% ({dmon['samples']} rows)"
    c = r["config"]
    lines = [
        f"hvdtrain sanity: {r['verdict']}" + (" on SYNTHETIC data (no reader: the loader is not measured)"
                                               if r.get("synthetic") else ""),
        f"  code      {r['git_sha']}{' (dirty)' if r['git_dirty'] else ''}",
        f"  config    {r['config_hash']}  preset {c['preset']}, batch {c['train']['batch_size']}/rank x "
        f"accum {c['train']['grad_accum_steps']} x {r['ranks']} ranks, lr {c['optim']['lr']}, "
        f"embed {c['model']['embed_dim']}, seed {c['seed']}, {c['train']['steps']} steps",
        f"  data      {r['data']['train']['spec']} ({r['data']['train']['samples']} samples, "
        f"fingerprint {r['data']['train']['fingerprint']})",
        f"  loader    {r['loader_img_s']:.1f} img/s ({r['loader']}, {r['dali_threads']} thread(s)/rank, all ranks)"
        if r["loader_img_s"] is not None else f"  loader    not measured: {r['loader']}",
        f"  loss      step1 {r['loss_step1']:.4f} (ln {c['train']['batch_size']} = {r['ln_batch']:.4f})"
        f"  first10 {r['loss_first10']:.4f}  last10 {r['loss_last10']:.4f}  reduction {r['loss_reduction']:.4f}",
        f"  time      {r['wall_time_s']:.1f} s ({r['wall_time_s'] / 60:.2f} min)  train "
        f"{r['images_per_s']:.1f} img/s (all ranks), data wait {100 * r['data_wait_share']:.1f}%",
        f"  memory    max {mem:.2f} GiB ({r['memory_kind']})",
        f"  GPU util  {util}",
        f"  step time {timing.describe(r['breakdown'])}",
        "",
        S.table(r["slos"], S.load(r.get("slo_file"))),
        "",
        f"verdict: {r['verdict']}" + (" (on SYNTHETIC data)" if r.get("synthetic") else "")
        + (f": {r['why']}" if r.get("why") else ""),
    ]
    return "\n".join(lines)


def sanity_markdown(r: dict) -> str:
    body = sanity_table(r)
    syn = " on SYNTHETIC data" if r.get("synthetic") else ""
    return (f"# hvdtrain sanity — {r['verdict']}{syn}\n\n"
            f"Run `{r['run_dir']}`, code `{r['git_sha']}`{' (dirty: ' + ', '.join(r['git_changed']) + ')' if r['git_dirty'] else ''}, "
            f"config hash `{r['config_hash']}`, data fingerprint `{r['data']['train']['fingerprint']}`.\n\n"
            f"```\n{body}\n```\n\n![loss per step](loss.png)\n\n"
            f"Versions: {', '.join(f'{k} {v}' for k, v in r['versions'].items())}.\n")


def read_curves(metrics_path: str) -> tuple[dict, dict]:
    """(train records, val records) of metrics.jsonl, each by step. A resumed run logs some
    steps twice; the later record of a step wins."""
    train, val = {}, {}
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            (val if "val_loss" in rec else train)[rec["step"]] = rec
    return train, val


def curve_panels(train: dict, val: dict) -> list[str]:
    """The panels of curves.png that have data: loss, val accuracy (with a val set only)
    and learning rate."""
    has = {"loss": bool(train or val), "val accuracy": any("val_top1" in r for r in val.values()),
           "learning rate": any("lr" in r for r in train.values())}
    return [name for name, yes in has.items() if yes]


def curves_plot(metrics_path: str, path: str, title: str) -> str | None:
    """curves.png from metrics.jsonl, a panel 4 inches wide for each of `curve_panels`:
    train and val loss, val accuracy, learning rate."""
    if not os.path.exists(metrics_path):
        return None
    train, val = read_curves(metrics_path)
    panels = curve_panels(train, val)
    if not panels:
        return None
    ts, vs = sorted(train), sorted(val)

    def draw(plt):
        fig, axes = plt.subplots(1, len(panels), figsize=(4 * len(panels), 3.4), dpi=100, squeeze=False)
        ax = dict(zip(panels, axes[0]))
        if "loss" in ax:
            if ts:
                ax["loss"].plot(ts, [train[s]["train_loss"] for s in ts], lw=1, label="train (mean over ranks)")
            if vs:
                ax["loss"].plot(vs, [val[s]["val_loss"] for s in vs], "o-", ms=3, label="val")
            ax["loss"].legend(fontsize=7)
        if "val accuracy" in ax:
            ax["val accuracy"].plot(vs, [val[s]["val_top1"] for s in vs], "o-", ms=3, label="top-1")
            ax["val accuracy"].plot(vs, [val[s]["val_top5"] for s in vs], "o-", ms=3, label="top-5")
            ax["val accuracy"].legend(fontsize=7)
        if "learning rate" in ax:
            ax["learning rate"].plot(ts, [train[s]["lr"] for s in ts], lw=1)
        for name, a in ax.items():
            a.set_xlabel("optimizer step")
            a.set_title(name, fontsize=9)
            a.grid(alpha=0.3)
        fig.suptitle(title, fontsize=9)
        return fig
    return plot(path, draw)
