"""What a run says while it runs: rank 0's console lines, progress bar, metrics.jsonl and
TensorBoard scalars (`Logs`), and one-line messages (`say`: rank 0's; `say_here`: this
rank's). Reports and plots written at the end are `hvdtrain.report`.
"""
from __future__ import annotations

import json
import os
import sys

from hvdtrain import config as C
from hvdtrain import dist


def say(line: str, file=None) -> None:
    """Print `line` on rank 0 only, flushed: for what every rank knows alike (one copy is
    enough). `file`: sys.stdout by default."""
    if dist.is_primary():
        print(line, file=file or sys.stdout, flush=True)


def say_here(line: str) -> None:
    """Print `line` on this rank, flushed: for what only this rank knows (it builds an
    index, waits for a lock, rebuilds a pipeline)."""
    print(line, flush=True)


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
