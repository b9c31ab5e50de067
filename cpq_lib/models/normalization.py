"""Input normalisation inside the model, so a checkpoint carries the statistics it was trained with."""

from __future__ import annotations

import warnings
from typing import Sequence

import torch
from torch import nn

# beyond these bounds a first batch is clearly not images in [0, 1] (e.g. pixels in 0..255, or standardised)
INPUT_RANGE = (0.0, 1.0)
RANGE_SLACK = 0.5


class InputNormalization(nn.Module):
    """``(x - mean) / std`` per channel, for inputs in [0, 1] (images as ``ToTensor`` gives them).

    The first batch a module sees is checked once: pixels in 0..255 would otherwise give chance accuracy
    without a word (0.3% on the shipped ResNet-20). One check per module, so the forward reads nothing
    from the device afterwards.
    """

    def __init__(self, mean: Sequence[float], std: Sequence[float]) -> None:
        super().__init__()
        self.register_buffer("mean", torch.tensor(list(mean)).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(list(std)).view(1, -1, 1, 1))
        self._range_checked = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self._range_checked and not torch.compiler.is_compiling():
            self._range_checked = True
            check_input_range(x)
        return (x - self.mean) / self.std


def check_input_range(x: torch.Tensor) -> None:
    """Warn (once per caller) when a batch's values are clearly outside [0, 1]."""
    if x.numel() == 0 or not x.is_floating_point() or x.is_meta:  # meta tensors hold no values
        return
    values = x.detach()
    low, high = float(values.min()), float(values.max())
    if low < INPUT_RANGE[0] - RANGE_SLACK or high > INPUT_RANGE[1] + RANGE_SLACK:
        hint = " (pixels in 0..255? divide by 255)" if high > 2 and low >= 0 else ""
        warnings.warn(f"model input ranges from {low:.3g} to {high:.3g}; the model expects images in [0, 1]{hint}",
                      stacklevel=3)
