"""Models by name, built with a class count; no other code needs to know any architecture."""

from __future__ import annotations

from typing import Any, Callable

from torch import nn

from ..errors import ModelError
from .digits_cnn import DigitsCNN
from .resnet_cifar import CifarResNet
from .torchvision_models import TORCHVISION_MODELS, build_torchvision
from .vgg_small import VGGSmall

MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": DigitsCNN,
    "resnet20": lambda **kw: CifarResNet(depth=20, **kw),
    "resnet32": lambda **kw: CifarResNet(depth=32, **kw),
    "vgg_small": VGGSmall,
    # torchvision's ImageNet classifiers, parameter names unchanged (cpq_lib.models.torchvision_models)
    **{name: (lambda name: lambda **kw: build_torchvision(name, **kw))(name) for name in TORCHVISION_MODELS},
}


def build_model(name: str, num_classes: int, **kwargs: Any) -> nn.Module:
    """Build ``name`` for ``num_classes`` classes; kwargs: in_channels, width, mean, std (image_size for VGG)."""
    if name not in MODELS:
        raise ModelError(f"unknown model {name!r}; allowed: {', '.join(sorted(MODELS))}")
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ModelError(f"num_classes must be a positive integer, got {num_classes!r}")
    try:
        return MODELS[name](num_classes=num_classes, **kwargs)
    except TypeError as exc:  # e.g. image_size for a model that takes any size
        raise ModelError(f"bad arguments for model {name!r}: {exc}") from exc


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
