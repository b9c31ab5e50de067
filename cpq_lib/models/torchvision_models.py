"""torchvision's ImageNet classifiers (ResNet-18/50, MobileNetV2) with cpq's input normalisation inside.

The model is torchvision's own class with one extra submodule, ``input_norm``, applied first: parameter
names are torchvision's (``layer1.0.conv1``, ``features.3.conv.1.0``), so torchvision's weights load
into it unchanged and layer patterns written for torchvision models match. Weights come from
torchvision's download on a connected machine (``weights="DEFAULT"``) or from a local file of a
torchvision state dict (``weights_file``), read with ``weights_only=True``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn
from torchvision.models import MobileNetV2, ResNet
from torchvision.models.resnet import BasicBlock, Bottleneck

from ..errors import CheckpointError, ModelError
from .normalization import InputNormalization

TORCHVISION_MODELS = ("resnet18", "resnet50", "mobilenet_v2")
IMAGENET_CLASSES = 1000


class _InputNormalized:
    """Mixin: ``input_norm`` applied before the torchvision class's own forward."""

    def _add_input_norm(self, mean: Sequence[float], std: Sequence[float]) -> None:
        self.input_norm = InputNormalization(mean, std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(self.input_norm(x))


class NormalizedResNet(_InputNormalized, ResNet):
    def __init__(self, block: type[nn.Module], layers: list[int], *, mean: Sequence[float], std: Sequence[float],
                 **kwargs: Any) -> None:
        super().__init__(block, layers, **kwargs)
        self._add_input_norm(mean, std)


class NormalizedMobileNetV2(_InputNormalized, MobileNetV2):
    def __init__(self, *, mean: Sequence[float], std: Sequence[float], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._add_input_norm(mean, std)


def _classes() -> dict[str, Any]:
    return {
        "resnet18": lambda **kw: NormalizedResNet(BasicBlock, [2, 2, 2, 2], **kw),
        "resnet50": lambda **kw: NormalizedResNet(Bottleneck, [3, 4, 6, 3], **kw),
        "mobilenet_v2": lambda **kw: NormalizedMobileNetV2(**kw),
    }


def build_torchvision(name: str, num_classes: int = IMAGENET_CLASSES, in_channels: int = 3, width: float = 1.0,
                      mean: Sequence[float] = (0.485, 0.456, 0.406), std: Sequence[float] = (0.229, 0.224, 0.225),
                      **kwargs: Any) -> nn.Module:
    """torchvision's ``name`` (randomly initialised) for ``num_classes`` classes of RGB images."""
    if in_channels != 3:
        raise ModelError(f"{name} (torchvision) takes RGB images (in_channels 3), got in_channels={in_channels}")
    if kwargs:
        raise ModelError(f"unknown argument(s) {sorted(kwargs)} for {name}; allowed: num_classes, mean, std, width")
    if name == "mobilenet_v2":  # torchvision's width multiplier (0.35, 0.5, 0.75 are the published variants)
        return _classes()[name](num_classes=num_classes, mean=mean, std=std, width_mult=width)
    if width != 1.0:
        raise ModelError(f"{name} (torchvision) has no width multiplier; width must be 1.0, got {width} "
                         f"(mobilenet_v2 has one)")
    return _classes()[name](num_classes=num_classes, mean=mean, std=std)


def load_torchvision_weights(model: nn.Module, name: str, weights_file: str | os.PathLike | None = None) -> dict[str, Any]:
    """Load torchvision's ImageNet weights for ``name`` into ``model``: from ``weights_file`` (a state dict
    saved by ``torch.save(model.state_dict())``) or torchvision's download. Returns where they came from."""
    if weights_file is not None:
        path = Path(weights_file).expanduser()
        if not path.is_file():
            raise CheckpointError(f"weights file {path} does not exist")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as exc:  # noqa: BLE001 - any unreadable file
            raise CheckpointError(f"weights file {path} is not a readable state dict: {exc}") from exc
        source = {"weights_file": path.name}
    else:
        from torchvision import models

        try:
            weights = models.get_model_weights(name).DEFAULT
            state = weights.get_state_dict(progress=False)
        except Exception as exc:  # noqa: BLE001 - no network, no cache
            raise CheckpointError(f"torchvision's weights for {name} could not be downloaded ({exc}); on a machine "
                                  f"without internet give model.weights_file=<a saved state dict>") from exc
        source = {"torchvision_weights": str(weights)}
    if not isinstance(state, dict):
        raise CheckpointError(f"{name}: the weights are a {type(state).__name__}, not a state dict")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as exc:  # shapes that differ (another class count)
        raise CheckpointError(f"the weights do not fit {name}: {str(exc).splitlines()[-1].strip()}") from exc
    missing = [k for k in missing if not k.startswith("input_norm.")]
    if missing or unexpected:
        raise CheckpointError(f"the weights do not fit {name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    return source
