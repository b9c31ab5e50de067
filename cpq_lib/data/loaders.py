"""In-memory batch iteration with augmentation done on tensors, one batch at a time.

torch's DataLoader with per-image PIL transforms spends most of a CIFAR epoch in Python on 2 cores;
indexing a uint8 tensor and cropping/flipping the whole batch at once costs almost nothing.
Every epoch's order and augmentation come from a generator seeded by (seed, epoch), so a run
resumed after a kill sees exactly the batches an uninterrupted run would.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from .sources import ImageTensors


@dataclass(frozen=True)
class Augment:
    """Random crop after zero padding by ``pad`` pixels and, optionally, a horizontal flip."""

    pad: int = 4
    flip: bool = True


def random_crop_flip(images: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop (after padding) and flip of a uint8 or float (N, C, H, W) batch."""
    n, _, height, width = images.shape
    if augment.pad > 0:
        padded = torch.nn.functional.pad(images, (augment.pad,) * 4)
        offset_y = torch.randint(0, 2 * augment.pad + 1, (n,), generator=generator)
        offset_x = torch.randint(0, 2 * augment.pad + 1, (n,), generator=generator)
        rows = (offset_y[:, None] + torch.arange(height))[:, None, :, None]
        cols = (offset_x[:, None] + torch.arange(width))[:, None, None, :]
        batch_index = torch.arange(n)[:, None, None, None]
        channel_index = torch.arange(images.shape[1])[None, :, None, None]
        images = padded[batch_index, channel_index, rows, cols]
    if augment.flip:
        flip = torch.rand(n, generator=generator) < 0.5
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


class TensorBatchLoader:
    """Iterates (float images in [0, 1], labels) batches over an :class:`ImageTensors`."""

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        shuffle: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.data)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        n = len(self.data)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        for start in range(0, len(self) * self.batch_size, self.batch_size):
            index = order[start : start + self.batch_size]
            images = self.data.images[index]
            if self.augment is not None:
                images = random_crop_flip(images, self.augment, generator)
            yield images.float().div_(255.0), self.data.labels[index]
