"""Backbones: plain `nn.Module`s that map `(B, 3, H, W)` float images to `(B, num_classes)` logits.

`build_backbone(name, num_classes)` looks in `BACKBONES` (this project's models, added by `@register_backbone("name")`),
then torchvision's classifiers; `timm/<name>` is any timm model (the `timm` extra). No weights unless `pretrained=True`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

import torch
import torchvision
from torch import nn

BACKBONES: dict[str, Callable[..., nn.Module]] = {}
TIMM = "timm/"  # routes `timm/<name>` to timm; its ~1,300 models are never listed in --help or errors
# their auxiliary classifiers make the training forward return a tuple; the loss takes the main logits only
WITHOUT_AUX_HEADS = {"googlenet": {"aux_logits": False}, "inception_v3": {"aux_logits": False}}


def register_backbone(name: str) -> Callable:
    """Decorator: make `fn(num_classes, **kw) -> nn.Module` available as `build_backbone(name, ...)`."""

    def register(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
        BACKBONES[name] = fn
        return fn

    return register


def torchvision_backbones() -> list[str]:
    return sorted(torchvision.models.list_models(module=torchvision.models))


def available_backbones() -> list[str]:
    return sorted(BACKBONES) + torchvision_backbones()


def check_backbone(name: str) -> None:
    """Raise ValueError, naming the choices, unless `build_backbone` knows `name` (timm checks its own)."""
    if name not in available_backbones() and not name.startswith(TIMM):
        raise ValueError(
            f"unknown backbone {name!r}; choose simple_cnn, resnet18, mobilenet_v3_small, timm/<name>, ... "
            f"(all: {', '.join(available_backbones())})"
        )


class SimpleCNN(nn.Module):
    """Four conv blocks (conv 3x3, batch norm, ReLU, 2x2 max pool) doubling channels from `width`, global average
    pool, linear head: any image size >= 32 (four halvings leave >= 2x2). ~0.4 M parameters at the default width."""

    def __init__(self, num_classes: int, width: int = 32, in_channels: int = 3, dropout: float = 0.1) -> None:
        super().__init__()
        layers, channels = [], in_channels
        for i in range(4):
            out = width * 2**i
            conv = nn.Conv2d(channels, out, 3, padding=1, bias=False)  # bias is redundant before batch norm
            layers += [conv, nn.BatchNorm2d(out), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(dropout), nn.Linear(channels, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 3, H, W) -> (B, 8*width, H/16, W/16)
        return self.head(self.pool(x))  # -> (B, 8*width, 1, 1) -> (B, num_classes)


@register_backbone("simple_cnn")
def simple_cnn(num_classes: int, pretrained: bool = False, **kw) -> nn.Module:
    if pretrained:
        raise ValueError("simple_cnn has no pretrained weights; drop --pretrained or pick a torchvision backbone")
    return SimpleCNN(num_classes, **kw)


def _last_linear(model: nn.Module) -> str:
    """Name of the final nn.Linear: torchvision's classification head (`fc`, `classifier.3`, `heads.head`)."""
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(model).__name__} has no nn.Linear head (and no `head` submodule)")
    return linears[-1]


def head_name(model: nn.Module) -> str:
    """Name of `model`'s classification head: a timm model's `get_classifier()`, its `head` submodule (SimpleCNN,
    swin, ...), else the final nn.Linear. Everything else is the feature extractor that fine-tuning freezes."""
    # timm's heads come in many shapes (a 1x1 conv, a Linear after a norm): each model knows its own
    classifier = model.get_classifier() if callable(getattr(model, "get_classifier", None)) else None
    if named := [n for n, m in model.named_modules() if m is classifier]:
        return named[0]
    return "head" if isinstance(getattr(model, "head", None), nn.Module) else _last_linear(model)


def timm_backbone(name: str, num_classes: int, pretrained: bool = False, **kw) -> nn.Module:
    """timm's model `name` with a `num_classes`-way head; timm is imported here only, so runs without it pay nothing."""
    try:
        import timm
    except ImportError:
        raise ValueError(f'--backbone timm/{name} needs timm, an optional extra: pip install -e ".[timm]"') from None
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=4)  # all ~1,300 names: milliseconds
        raise ValueError(f"unknown timm model {name!r}; close: {', '.join(TIMM + c for c in close) or 'none'}")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kw)
    except Exception as error:  # Hub, HTTP, SSL errors, ...: all mean the weights could not be had (offline: ~1 min)
        if not pretrained:
            raise
        reason = (str(error).strip().splitlines() or [""])[0]
        raise ConnectionError(
            f"--pretrained: could not fetch the timm/{name} weights ({type(error).__name__}: {reason}). "
            "Run once on a connected machine (timm keeps them in the Hugging Face cache) or train without --pretrained."
        ) from error


def build_backbone(name: str, num_classes: int, pretrained: bool = False, **kw) -> nn.Module:
    """Build backbone `name` with a `num_classes`-way head. Nothing is downloaded unless `pretrained`."""
    check_backbone(name)
    if name in BACKBONES:
        return BACKBONES[name](num_classes, pretrained=pretrained, **kw)
    if name.startswith(TIMM):
        return timm_backbone(name.removeprefix(TIMM), num_classes, pretrained, **kw)
    kw = {**WITHOUT_AUX_HEADS.get(name, {}), **kw}  # one of torchvision's
    if not pretrained:
        if name in WITHOUT_AUX_HEADS:
            kw.setdefault("init_weights", True)  # torchvision warns that its default init will change
        return torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kw)
    weights = torchvision.models.get_model_weights(name).DEFAULT
    try:
        model = torchvision.models.get_model(name, weights=weights, **kw)
    except Exception as error:  # URLError, HTTPError, SSL errors, ...: all mean "could not fetch"
        cache = f"{torch.hub.get_dir()}/checkpoints/{weights.url.rsplit('/', 1)[-1]}"
        raise ConnectionError(
            f"--pretrained: could not fetch the {name} weights ({type(error).__name__}: {error}). "
            f"Download {weights.url} on a connected machine and put it at {cache}, or train without --pretrained."
        ) from error
    head = _last_linear(model)  # swap the ImageNet head for a fresh `num_classes`-way one
    parent, _, attr = head.rpartition(".")
    setattr(model.get_submodule(parent), attr, nn.Linear(model.get_submodule(head).in_features, num_classes))
    return model
