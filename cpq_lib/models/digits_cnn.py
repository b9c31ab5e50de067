"""A small CNN for 8x8 inputs: the `quick` tier trains it in seconds on a CPU."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .normalization import InputNormalization


def conv_bn_relu(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


class DigitsCNN(nn.Module):
    """stem conv -> conv -> 2x2 average pool -> conv -> global pool -> classifier (widths scale with ``width``).

    Average, not max, pooling: after a quantized convolution many outputs are mathematically equal
    (sums over a few integer levels), and the CPU's summation order breaks those ties in the last bit
    differently on each instruction set. Max pooling's backward sends the whole gradient to the one
    winner, so quantization-aware training went down a different path on another CPU (the stored
    notebooks 06-07 failed their checks under ATen's non-AVX kernels); the average's gradient does not
    depend on which of the equal values came out larger.
    """

    def __init__(self, num_classes: int = 10, in_channels: int = 1, width: float = 1.0,
                 mean: Sequence[float] = (0.5,), std: Sequence[float] = (0.25,)) -> None:
        super().__init__()
        w1, w2, w3 = (max(1, round(c * width)) for c in (16, 32, 64))
        self.input_norm = InputNormalization(mean, std)
        self.stem = conv_bn_relu(in_channels, w1)
        self.features = nn.Sequential(conv_bn_relu(w1, w2), nn.AvgPool2d(2), conv_bn_relu(w2, w3))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(w3, num_classes)

    def forward(self, x):
        x = self.features(self.stem(self.input_norm(x)))
        return self.classifier(self.pool(x).flatten(1))
