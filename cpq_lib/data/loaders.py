"""In-memory batch iteration with augmentation done on tensors, one batch at a time.

torch's DataLoader with per-image PIL transforms spends most of a CIFAR epoch in Python on 2 cores;
indexing a uint8 tensor and cropping/flipping the whole batch at once costs almost nothing.
Every epoch's order and augmentation come from a generator seeded by (seed, epoch), so a run
resumed after a kill sees exactly the batches an uninterrupted run would.

On a GPU the images live on the device (uint8, copied once per data set and device) and batches are
gathered, cropped and flipped there: the random draws still come from the CPU generator, in the
same order as the CPU path, but all of an epoch's draws are made up front and copied in one
non-blocking transfer, so the device path makes the same crops and flips and the epoch needs no
host round trip per batch.
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


def draw_crop_flip(n: int, augment: Augment, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The random part of :func:`random_crop_flip` for ``n`` images: (offset_y, offset_x, flip), each (n,)."""
    if augment.pad > 0:
        offset_y = torch.randint(0, 2 * augment.pad + 1, (n,), generator=generator)
        offset_x = torch.randint(0, 2 * augment.pad + 1, (n,), generator=generator)
    else:
        offset_y = offset_x = torch.zeros(n, dtype=torch.long)
    flip = torch.rand(n, generator=generator) < 0.5 if augment.flip else torch.zeros(n, dtype=torch.bool)
    return offset_y, offset_x, flip


def apply_crop_flip(images: torch.Tensor, augment: Augment, offset_y: torch.Tensor, offset_x: torch.Tensor,
                    flip: torch.Tensor) -> torch.Tensor:
    """Crop (after zero padding) and flip a batch as drawn; runs wherever ``images`` and the draws are."""
    n, channels, height, width = images.shape
    device = images.device
    if augment.pad > 0:
        padded = torch.nn.functional.pad(images, (augment.pad,) * 4)
        rows = (offset_y[:, None] + torch.arange(height, device=device))[:, None, :, None]
        cols = (offset_x[:, None] + torch.arange(width, device=device))[:, None, None, :]
        batch_index = torch.arange(n, device=device)[:, None, None, None]
        channel_index = torch.arange(channels, device=device)[None, :, None, None]
        images = padded[batch_index, channel_index, rows, cols]
    if augment.flip:
        images = torch.where(flip[:, None, None, None], images.flip(3), images)
    return images


def random_crop_flip(images: torch.Tensor, augment: Augment, generator: torch.Generator) -> torch.Tensor:
    """Per-image random crop (after padding) and flip of a uint8 or float (N, C, H, W) batch."""
    return apply_crop_flip(images, augment, *draw_crop_flip(images.shape[0], augment, generator))


class TensorBatchLoader:
    """Iterates (float images in [0, 1], labels) batches over an :class:`ImageTensors`.

    ``device``: where batches are made. ``resident`` (default: on CUDA) keeps the images on the device
    and augments there with the epoch's draws made up front; ``resident=True`` on the CPU runs the same
    code on CPU tensors (which is how its equivalence to the CPU path is tested without a GPU).
    ``shard=(rank, world)``: every global batch of ``batch_size`` is drawn (order, crops, flips) as one
    process would, cut into ``world`` nearly equal pieces, and piece ``rank`` is yielded (distributed
    training sees the single process's batches, split between the ranks).
    """

    def __init__(
        self,
        data: ImageTensors,
        batch_size: int,
        shuffle: bool = False,
        augment: Augment | None = None,
        seed: int = 0,
        drop_last: bool = False,
        device: str | torch.device = "cpu",
        resident: bool | None = None,
        shard: tuple[int, int] = (0, 1),
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        rank, world = shard
        if not 0 <= rank < world or world > batch_size:
            raise ValueError(f"shard must be (rank, world) with 0 <= rank < world <= batch_size ({batch_size}), got {shard!r}")
        self.shard = (rank, world)
        self.data = data
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.resident = self.device.type == "cuda" if resident is None else resident
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
        starts = range(0, len(self) * self.batch_size, self.batch_size)
        if self.resident:
            yield from self._resident_batches(order, starts, generator)
            return
        for start in starts:
            index = order[start : start + self.batch_size]
            mine = self._mine(len(index))
            images = self.data.images[index[mine]]
            if self.augment is not None:  # the whole global batch's draws, in the single process's order
                draws = draw_crop_flip(len(index), self.augment, generator)
                images = apply_crop_flip(images, self.augment, *(d[mine] for d in draws))
            index = index[mine]
            images, labels = images.to(torch.get_default_dtype()).div_(255.0), self.data.labels[index]
            if self.device.type != "cpu":
                images, labels = images.to(self.device), labels.to(self.device)
            yield images, labels

    def _resident_batches(self, order: torch.Tensor, starts: range,
                          generator: torch.Generator) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        stored = self.data.on(self.device)
        sizes = [min(self.batch_size, len(order) - start) for start in starts]
        if self.augment is not None:  # the CPU path's draws, in its order: order, then batch by batch
            draws = [draw_crop_flip(size, self.augment, generator) for size in sizes]
            offset_y, offset_x, flip = (torch.cat([d[k] for d in draws]) if draws else torch.zeros(0) for k in range(3))
            host = torch.stack([order[: sum(sizes)], offset_y, offset_x, flip.long()])
        else:
            host = order[: sum(sizes)][None]
        if self.device.type == "cuda":
            host = host.pin_memory()
        plan = host.to(self.device, non_blocking=True)  # one transfer per epoch
        for start, size in zip(starts, sizes):
            rows = plan[:, start : start + size][:, self._mine(size)]
            index = rows[0]
            images = stored.images[index]
            if self.augment is not None:
                images = apply_crop_flip(images, self.augment, rows[1], rows[2], rows[3].bool())
            yield images.to(torch.get_default_dtype()).div_(255.0), stored.labels[index]

    def _mine(self, size: int) -> slice:
        """Positions in a global batch of ``size`` that belong to this rank (all of them for one process):
        ``torch.tensor_split``'s pieces, the first ``size % world`` one longer."""
        rank, world = self.shard
        piece, longer = divmod(size, world)
        low = rank * piece + min(rank, longer)
        return slice(low, low + piece + (rank < longer))
