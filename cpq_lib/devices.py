"""One rule for devices: functions never move a model they are given; a model on another device than
the one asked for is an error that names both (moving silently would change the caller's model and
hide a slow host-device copy). Functions that build their models themselves place them."""

from __future__ import annotations

import torch
from torch import nn

from .errors import CpqError


class DeviceError(CpqError):
    """A model is not on the device a function was asked to use."""


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (None for a model with neither)."""
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return None


def same_device(actual: torch.device, requested: torch.device) -> bool:
    if actual.type != requested.type:
        return False
    if requested.index is None or actual.index is None:
        return True  # "cuda" means the current CUDA device
    return actual.index == requested.index


def check_model_device(model: nn.Module, device: str | torch.device, where: str) -> torch.device:
    """``device`` as a torch.device, or DeviceError if ``model`` lives elsewhere."""
    requested = torch.device(device)
    actual = model_device(model)
    if actual is not None and not same_device(actual, requested):
        raise DeviceError(f"{where}: the model is on {actual} but device={str(device)!r} was requested; "
                          f"move it first (model.to({str(requested)!r})) or pass device={str(actual)!r}")
    return requested
