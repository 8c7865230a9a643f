"""Encoders and heads.

`ConvEncoder` is the sanity's image encoder: four stride-2 conv stages with GroupNorm
(no batch statistics, so a micro-batch's result does not depend on its neighbours and
gradient accumulation equals one large batch), global average pooling and a linear
projection to `embed_dim`.

`ResNet` is ResNet-18 / ResNet-50 (He et al. 2015, torchvision's v1.5 layout: stride in
the 3x3 conv of a bottleneck), written here so that hvdtrain needs no torchvision (whose
build must match torch's). The last norm of each residual branch starts at zero
(Goyal et al.), so every block starts as the identity. `norm="gn"` swaps BatchNorm for
GroupNorm where batch-independence matters (the np=1 / np=2 equality).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable

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


def _norm(kind: str, c: int) -> nn.Module:
    return nn.BatchNorm2d(c) if kind == "bn" else nn.GroupNorm(min(32, c // 4), c)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, c: int, stride: int, norm: str):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 3, stride, 1, bias=False), _norm(norm, c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, 1, 1, bias=False), _norm(norm, c)
        nn.init.zeros_(self.bn2.weight)
        self.down = _shortcut(cin, c, stride, norm)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        return F.relu(self.bn2(self.conv2(y)) + self.down(x), inplace=True)


class Bottleneck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, c: int, stride: int, norm: str):
        super().__init__()
        cout = c * 4
        self.conv1, self.bn1 = nn.Conv2d(cin, c, 1, bias=False), _norm(norm, c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, stride, 1, bias=False), _norm(norm, c)
        self.conv3, self.bn3 = nn.Conv2d(c, cout, 1, bias=False), _norm(norm, cout)
        nn.init.zeros_(self.bn3.weight)
        self.down = _shortcut(cin, cout, stride, norm)

    def forward(self, x):
        y = F.relu(self.bn1(self.conv1(x)), inplace=True)
        y = F.relu(self.bn2(self.conv2(y)), inplace=True)
        return F.relu(self.bn3(self.conv3(y)) + self.down(x), inplace=True)


def _shortcut(cin: int, cout: int, stride: int, norm: str) -> nn.Module:
    if stride == 1 and cin == cout:
        return nn.Identity()
    return nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), _norm(norm, cout))


RESNETS = {"resnet18": (BasicBlock, (2, 2, 2, 2)), "resnet50": (Bottleneck, (3, 4, 6, 3))}


class ResNet(nn.Module):
    """Encoder: stem -> 4 stages -> global average pool; `out_dim` features (512 or 2048)."""

    def __init__(self, name: str, norm: str = "bn", small_stem: bool = False):
        super().__init__()
        block, depths = RESNETS[name]
        if small_stem:  # 32-64 px inputs: keep the resolution the 7x7/2 + pool would throw away
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 3, 1, 1, bias=False), _norm(norm, 64), nn.ReLU(inplace=True))
        else:
            self.stem = nn.Sequential(nn.Conv2d(3, 64, 7, 2, 3, bias=False), _norm(norm, 64), nn.ReLU(inplace=True),
                                      nn.MaxPool2d(3, 2, 1))
        layers, cin = [], 64
        for i, depth in enumerate(depths):
            c = 64 * 2 ** i
            for j in range(depth):
                layers.append(block(cin, c, 2 if (j == 0 and i > 0) else 1, norm))
                cin = c * block.expansion
        self.layers = nn.Sequential(*layers)
        self.out_dim = cin
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(x)).mean(dim=(2, 3))


class Projected(nn.Module):
    """Contrastive head on a ResNet: features -> MLP -> embed_dim (SimCLR's projection)."""

    def __init__(self, encoder: nn.Module, feat_dim: int, embed_dim: int):
        super().__init__()
        self.encoder = encoder
        self.head = nn.Sequential(nn.Linear(feat_dim, feat_dim), nn.ReLU(inplace=True), nn.Linear(feat_dim, embed_dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(x))


# ---------------------------------------------------------------- the registry
@dataclass(frozen=True)
class ModelEntry:
    name: str
    about: str                      # one line for the README's model table
    build: Callable[..., nn.Module]  # build(m, num_classes) -> module; m: ModelConfig (width, embed_dim, norm, ...)


REGISTRY: dict[str, ModelEntry] = {}


def register(name: str, about: str):
    """Decorator: `@register("mynet", "what it is")` over `def build(m, num_classes) -> nn.Module`.
    `num_classes` set: a classifier (logits); None: an embedding model of `m.embed_dim`
    outputs (contrastive). That is all a new model needs: config choices, the README's
    table (`python -m hvdtrain.model`) and the registry tests follow from this entry."""
    def add(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        if name in REGISTRY:
            raise ValueError(f"model {name!r} is registered twice")
        REGISTRY[name] = ModelEntry(name, about, fn)
        return fn
    return add


def names() -> tuple[str, ...]:
    return tuple(REGISTRY)


@register("convnet", "the sanity's encoder: 4 stride-2 conv stages, GroupNorm (batch-independent), "
                     "`--model.width`, `--model.embed_dim`")
def _convnet(m, num_classes: int | None) -> nn.Module:
    enc = ConvEncoder(m.width, m.embed_dim)
    return enc if num_classes is None else Classifier(enc, m.embed_dim, num_classes)


def _resnet(name: str, m, num_classes: int | None) -> nn.Module:
    enc = ResNet(name, m.norm, m.small_stem)
    if num_classes is None:
        return Projected(enc, enc.out_dim, m.embed_dim)
    return nn.Sequential(enc, nn.Linear(enc.out_dim, num_classes))


@register("resnet18", "ResNet-18 (torchvision v1.5 layout, zero-init last norm); `--model.norm=bn` or `gn`, "
                      "`--model.small_stem=True` for 32-64 px")
def _resnet18(m, num_classes: int | None) -> nn.Module:
    return _resnet("resnet18", m, num_classes)


@register("resnet50", "ResNet-50 (bottlenecks, as resnet18 otherwise): the ImageNet recipe's model")
def _resnet50(m, num_classes: int | None) -> nn.Module:
    return _resnet("resnet50", m, num_classes)


def build(m, num_classes: int | None = None) -> nn.Module:
    """The registered model `m.name` (m: a ModelConfig). The module remembers its head
    (`num_classes`), which the class checks and resume compare with the data."""
    if m.name not in REGISTRY:
        raise ValueError(f"unknown model {m.name!r} (registered: {', '.join(REGISTRY)})")
    model = REGISTRY[m.name].build(m, num_classes)
    model.num_classes = num_classes
    return model


def head_classes(model: nn.Module) -> int | None:
    """Number of classes of a classifier's head (None for embedding models)."""
    return getattr(model, "num_classes", None)


def readme_table() -> str:
    """The README's model table, made from the registry (a test keeps the README equal to it)."""
    rows = ["| `--model.name` | what |", "| --- | --- |"]
    rows += [f"| `{e.name}` | {e.about} |" for e in REGISTRY.values()]
    return "\n".join(rows)


if __name__ == "__main__":  # python -m hvdtrain.model: the registry as the README's table
    print(readme_table())
    sys.exit(0)
