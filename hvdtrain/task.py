"""The task room: what a training task means for the data, the model and the numbers.

    --train.task=classify     cross-entropy (label smoothing, mixup/cutmix), top-1/top-5
    --train.task=contrastive  two-view InfoNCE; val reports retrieval top-1/top-5

A task says how many views the pipeline makes per image, whether the model gets a
classifier head, its training loss (`info_nce` here; mixup's soft cross-entropy is a
kernel, `kernels.mixup`) and its validation sums. The step (`hvdtrain.step`), the val
pass (`hvdtrain.valpass`) and the run (`hvdtrain.session`) ask it instead of branching
on the task's name. Collectives come in as arguments (`gather`), so this
module does not import Horovod's wrapper.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from hvdtrain.kernels import mixup


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float, gather=None, rank: int = 0) -> torch.Tensor:
    """Symmetric two-view InfoNCE: view i of one image must pick view i of the same image
    among the B images of its micro-batch. With uninformative embeddings every choice is
    equally likely, so the loss starts at ln(B) (ln 16 = 2.7726 for the sanity).

    `gather` (dist.allgather_grad): the candidates are every rank's views (B x ranks
    negatives, gradients flow back through the gather); `rank` places this rank's rows."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    target = torch.arange(z1.shape[0], device=z1.device)
    if gather is None:
        logits = z1 @ z2.t() / temperature
        return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))
    all1, all2 = gather(z1), gather(z2)
    target = target + rank * z1.shape[0]
    return 0.5 * (F.cross_entropy(z1 @ all2.t() / temperature, target)
                  + F.cross_entropy(z2 @ all1.t() / temperature, target))


class Classify:
    name = "classify"
    views = 1                  # images the pipeline makes per sample (train)
    val_views = 1              # classify val is deterministic: resize + centre crop
    needs_classes = True       # the head has num_classes outputs; train/val/head classes are checked

    def head(self, num_classes: int | None) -> int | None:
        return num_classes

    def loss(self, cfg, model, views: list[torch.Tensor], labels: torch.Tensor, num_classes: int | None,
             gen: torch.Generator | None, gather=None, rank: int = 0) -> torch.Tensor:
        a = cfg.aug
        if a.mixup > 0 or a.cutmix > 0:
            # images + soft targets: one image kernel and one target kernel on CUDA, torch elsewhere
            x = views[0]
            p = mixup.sample_params(x.shape[2], x.shape[3], a.mixup, a.cutmix, a.switch_prob, gen)
            x, targets = mixup.mix(x, labels, num_classes, p, a.label_smoothing)
            return mixup.soft_cross_entropy(model(x).float(), targets)
        return F.cross_entropy(model(views[0]).float(), labels, label_smoothing=a.label_smoothing)

    def eval_sums(self, cfg, model, views: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
        """[loss sum, top-1 hits, top-5 hits, count] of one val batch, float64 on the device."""
        logits = model(views[0]).float()
        top = logits.topk(min(5, logits.shape[1]), dim=1).indices
        hit = top == labels[:, None]
        return _sums(F.cross_entropy(logits, labels, reduction="sum"), hit, labels.numel())

    def bound_k(self, num_classes: int | None, batch: int) -> int:
        """The k of the val-loss bound factor x ln(k): chance level is ln(classes)."""
        return num_classes or 2


class Contrastive:
    name = "contrastive"
    views = 2
    val_views = 2              # two random views (fixed seed, no shuffle)
    needs_classes = False

    def head(self, num_classes: int | None) -> int | None:
        return None            # an embedding model of model.embed_dim outputs

    def loss(self, cfg, model, views, labels, num_classes, gen, gather=None, rank: int = 0) -> torch.Tensor:
        z1, z2 = model(views[0]), model(views[1])
        g = gather if cfg.model.gather_negatives else None
        return info_nce(z1.float(), z2.float(), cfg.model.temperature, g, rank)

    def eval_sums(self, cfg, model, views, labels) -> torch.Tensor:
        z1, z2 = model(views[0]).float(), model(views[1]).float()
        n = z1.shape[0]
        loss = info_nce(z1, z2, cfg.model.temperature)
        # retrieval accuracy: view 1 of image i finds view 2 of image i among the batch
        logits = F.normalize(z1, dim=1) @ F.normalize(z2, dim=1).t()
        hit = logits.topk(min(5, n), dim=1).indices == torch.arange(n, device=z1.device)[:, None]
        return _sums(loss * n, hit, n)

    def bound_k(self, num_classes: int | None, batch: int) -> int:
        return batch           # InfoNCE starts at ln(batch)


def _sums(loss_sum: torch.Tensor, hit: torch.Tensor, n: int) -> torch.Tensor:
    dev = loss_sum.device
    return torch.stack([loss_sum.double(), hit[:, 0].sum().double(), hit.any(dim=1).sum().double(),
                        torch.tensor(float(n), dtype=torch.float64, device=dev)])


TASKS = {t.name: t for t in (Contrastive(), Classify())}


def get(name: str):
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (have: {', '.join(TASKS)})")
    return TASKS[name]


def val_bound(factor: float, task, num_classes: int | None, batch: int) -> float | None:
    """The largest believable val loss: factor x ln(k), k from the task (None = off)."""
    if factor <= 0:
        return None
    return factor * math.log(max(2, task.bound_k(num_classes, batch)))
