"""Encoders and heads.

`ConvEncoder` is the sanity's image encoder: four stride-2 conv stages with GroupNorm
(no batch statistics, so a micro-batch's result does not depend on its neighbours and
gradient accumulation equals one large batch), global average pooling and a linear
projection to `embed_dim`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _stage(cin: int, cout: int) -> nn.Sequential:
    groups = min(8, cout)
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, stride=2, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
        nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        nn.GroupNorm(groups, cout),
        nn.ReLU(inplace=True),
    )


class ConvEncoder(nn.Module):
    def __init__(self, width: int = 32, embed_dim: int = 256, stages: int = 4):
        super().__init__()
        chans = [3] + [width * 2 ** i for i in range(stages)]
        self.features = nn.Sequential(*[_stage(chans[i], chans[i + 1]) for i in range(stages)])
        self.proj = nn.Linear(chans[-1], embed_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.features(x).mean(dim=(2, 3))
        return self.proj(h)


class Classifier(nn.Module):
    def __init__(self, encoder: nn.Module, embed_dim: int, num_classes: int):
        super().__init__()
        self.encoder, self.head = encoder, nn.Linear(embed_dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.encoder(x)))


def build(name: str, width: int, embed_dim: int, num_classes: int | None = None) -> nn.Module:
    if name != "convnet":
        raise ValueError(f"unknown model {name!r} (have: convnet)")
    enc = ConvEncoder(width, embed_dim)
    return enc if num_classes is None else Classifier(enc, embed_dim, num_classes)


def info_nce(z1: torch.Tensor, z2: torch.Tensor, temperature: float) -> torch.Tensor:
    """Symmetric two-view InfoNCE: view i of one image must pick view i of the same image
    among the B images of its micro-batch. With uninformative embeddings every choice is
    equally likely, so the loss starts at ln(B) (ln 16 = 2.7726 for the sanity)."""
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    logits = z1 @ z2.t() / temperature
    target = torch.arange(z1.shape[0], device=z1.device)
    return 0.5 * (F.cross_entropy(logits, target) + F.cross_entropy(logits.t(), target))


def ln(x: float) -> float:
    return math.log(x)
