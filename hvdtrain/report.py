"""Report writers: JSON, Markdown and PNG beside each other in the run folder, and a
training run's logs (console lines, tqdm, metrics.jsonl, TensorBoard: `Logs`)."""
from __future__ import annotations

import json
import os
import sys

from hvdtrain import config as C
from hvdtrain import dist
from hvdtrain import slo as S
from hvdtrain import timing


def write_json(path: str, obj: dict) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=str)
    os.replace(tmp, path)


def _pyplot():
    """matplotlib.pyplot on the file-only Agg backend, or None where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    return plt


def loss_plot(path: str, losses: list[float], title: str) -> str | None:
    """Loss per optimizer step as a PNG; None (and no file) if matplotlib is missing."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
    ax.plot(range(1, len(losses) + 1), losses, lw=1)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (mean over ranks)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def util_plot(path: str, timeline: list[tuple[float, float]]) -> str | None:
    """The GPU utilisation timeline of the measured window as a PNG."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(6, 3), dpi=110)
    util_axes(ax, timeline)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


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


def curves_plot(metrics_path: str, path: str, title: str) -> str | None:
    """curves.png from metrics.jsonl: train and val loss, val accuracy, learning rate.
    A resumed run logs some steps twice; the later record of a step wins."""
    plt = _pyplot()
    if plt is None or not os.path.exists(metrics_path):
        return None
    train, val = {}, {}
    with open(metrics_path) as f:
        for line in f:
            rec = json.loads(line)
            (val if "val_loss" in rec else train)[rec["step"]] = rec
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4), dpi=100)
    ts, vs = sorted(train), sorted(val)
    axes[0].plot(ts, [train[s]["train_loss"] for s in ts], lw=1, label="train (mean over ranks)")
    if vs:
        axes[0].plot(vs, [val[s]["val_loss"] for s in vs], "o-", ms=3, label="val")
        axes[1].plot(vs, [val[s]["val_top1"] for s in vs], "o-", ms=3, label="top-1")
        axes[1].plot(vs, [val[s]["val_top5"] for s in vs], "o-", ms=3, label="top-5")
    axes[2].plot(ts, [train[s]["lr"] for s in ts], lw=1)
    for ax, name in zip(axes, ("loss", "val accuracy", "learning rate")):
        ax.set_xlabel("optimizer step")
        ax.set_title(name, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    if vs:
        axes[1].legend(fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


class Logs:
    """Rank 0's console lines, progress bar, metrics.jsonl and TensorBoard scalars."""

    def __init__(self, cfg: C.Config, run_dir: str, start_step: int):
        self.on = dist.is_primary()
        self.bar = self.tb = self.metrics = None
        self.tty = False
        if not self.on:
            return
        self.metrics = open(os.path.join(run_dir, "metrics.jsonl"), "a")
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(run_dir)
        if cfg.run.progress:
            from tqdm import tqdm

            self.tty = sys.stderr.isatty()  # under horovodrun never: a redraw every 30 s, not 2 per second
            # (tqdm's monitor thread would redraw every maxinterval, 10 s by default, whatever mininterval says)
            self.bar = tqdm(total=cfg.train.steps, initial=start_step, unit="step", dynamic_ncols=True,
                            mininterval=0.5 if self.tty else 30, maxinterval=10 if self.tty else 60,
                            file=sys.stderr)

    def record(self, rec: dict, line: str | None = None) -> None:
        if not self.on:
            return
        self.metrics.write(json.dumps(rec) + "\n")
        self.metrics.flush()
        if self.tb is not None:
            for k, v in rec.items():
                if k != "step" and isinstance(v, (int, float)) and v is not None:
                    self.tb.add_scalar(k.replace("val_", "val/").replace("train_", "train/"), v, rec["step"])
        if line:  # on a terminal, above the bar; in a log file (horovodrun, sbatch), a plain line
            (self.bar.write if self.bar is not None and self.tty else print)(line, flush=True)
        if self.bar is not None and "throughput_img_s" in rec:
            self.bar.set_postfix({"loss": f"{rec['train_loss']:.4f}", "img/s": f"{rec['throughput_img_s']:.0f}"},
                                 refresh=False)

    def tick(self) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if not self.on:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.metrics.close()
