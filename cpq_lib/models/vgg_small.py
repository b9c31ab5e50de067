"""VGG-Small (LQ-Nets / ClassPathQ): 128,128,M,256,256,M,512,512,M then one linear classifier."""

from __future__ import annotations

from typing import Sequence

from torch import nn

from .normalization import InputNormalization

VGG_SMALL_LAYOUT = (128, 128, "M", 256, 256, "M", 512, 512, "M")


class VGGSmall(nn.Module):
    def __init__(self, num_classes: int = 10, in_channels: int = 3, width: float = 1.0, image_size: int = 32,
                 mean: Sequence[float] = (0.5, 0.5, 0.5), std: Sequence[float] = (0.25, 0.25, 0.25)) -> None:
        super().__init__()
        self.input_norm = InputNormalization(mean, std)
        layers: list[nn.Module] = []
        c_in, size = in_channels, image_size
        for item in VGG_SMALL_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2))
                size //= 2
            else:
                c_out = max(1, round(item * width))
                layers += [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]
                c_in = c_out
        if size < 1:
            raise ValueError(f"VGG-Small needs inputs of at least 8x8 pixels, got {image_size}")
        self.features = nn.Sequential(*layers)
        self.classifier = nn.Linear(c_in * size * size, num_classes)

    def forward(self, x):
        return self.classifier(self.features(self.input_norm(x)).flatten(1))
