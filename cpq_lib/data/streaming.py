"""Data read lazily through ``torch.utils.data``: the path for data sets that do not fit in memory.

A :class:`DatasetPart` is one split (train, validation or test) of a map-style ``Dataset`` whose items
are ``(image tensor in [0, 1], label)``; nothing is decoded until a batch asks for it, so memory does not
grow with the data set. A part may carry two views of the same images: the evaluation view (e.g.
resize + centre crop) and the augmented training view (e.g. RandomResizedCrop + flip); calibration,
class scoring and BatchNorm re-estimation read the evaluation view of training images, as the
in-memory path does.

Determinism: every item is drawn with its own seed, ``(seed, epoch, position in the epoch)``, inside
a forked RNG, so random transforms give the same crops whatever the number of DataLoader workers,
however the epoch is split between ranks, and whatever else consumed the global RNG: a run resumed
after a kill, or run on 2 ranks instead of 1, sees exactly the images an uninterrupted single process
would. torchvision's transforms draw from torch's global generator, which is what the fork seeds.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..errors import DataError

SEED_STRIDE = 100_003  # (seed, epoch) -> one generator seed, as TensorBatchLoader derives its own


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """Every item's label without decoding images: ``targets`` (torchvision's data sets), ``labels``, or
    ``samples`` of ``(path, label)``; a data set with none of them is read once, item by item."""
    for attribute in ("targets", "labels"):
        values = getattr(dataset, attribute, None)
        if values is not None:
            return np.asarray(values, dtype=np.int64)
    samples = getattr(dataset, "samples", None)
    if samples is not None:
        return np.asarray([label for _, label in samples], dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


class _Seeded(Dataset):
    """Item ``(index, seed)`` of the wrapped data set, drawn with torch's global RNG seeded by ``seed``."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, item: tuple[int, int]) -> Any:
        index, seed = item
        if seed < 0:  # no randomness asked for (evaluation views)
            return self.dataset[index]
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class DatasetPart:
    """One split read lazily from a map-style ``Dataset`` (see the module doc).

    ``dataset``: the evaluation view; ``augmented``: the training view of the same items (None: the
    evaluation view is used for training too); ``indices``: which items of them form this part;
    ``labels``: those items' labels (read from the data set when not given); ``workers``, ``pin_memory``:
    DataLoader settings (they change speed, never the batches).
    """

    def __init__(self, dataset: Dataset, *, augmented: Dataset | None = None, indices: Sequence[int] | None = None,
                 labels: Sequence[int] | np.ndarray | None = None, workers: int = 0, pin_memory: bool = False) -> None:
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise DataError(f"workers must be an integer >= 0 (DataLoader worker processes), got {workers!r}")
        self.dataset = dataset
        self.augmented = augmented
        self.workers = workers
        self.pin_memory = pin_memory
        all_labels = np.asarray(labels, dtype=np.int64) if labels is not None and indices is None else None
        if indices is None:
            self.indices = np.arange(len(dataset), dtype=np.int64)
            self._labels = all_labels if all_labels is not None else dataset_labels(dataset)
        else:
            self.indices = np.asarray(indices, dtype=np.int64)
            self._labels = (np.asarray(labels, dtype=np.int64) if labels is not None
                            else dataset_labels(dataset)[self.indices])
        if augmented is not None and len(augmented) != len(dataset):
            raise DataError(f"the augmented view has {len(augmented)} items, the evaluation view {len(dataset)}: "
                            f"they must be two views of the same items")
        if self._labels.shape != self.indices.shape:
            raise DataError(f"{len(self._labels)} labels for {len(self.indices)} items")
        if len(self.indices) and (self.indices.min() < 0 or self.indices.max() >= len(dataset)):
            raise DataError(f"item indices must lie in 0..{len(dataset) - 1}")

    def __len__(self) -> int:
        return int(self.indices.shape[0])

    def __repr__(self) -> str:
        return f"DatasetPart({type(self.dataset).__name__}, {len(self)} items, workers={self.workers})"

    @property
    def labels(self) -> torch.Tensor:
        return torch.from_numpy(self._labels)

    def subset(self, indices: np.ndarray | torch.Tensor) -> "DatasetPart":
        """The items at positions ``indices`` of this part (nothing is read)."""
        positions = np.asarray(indices, dtype=np.int64)
        return DatasetPart(self.dataset, augmented=self.augmented, indices=self.indices[positions],
                           labels=self._labels[positions], workers=self.workers, pin_memory=self.pin_memory)

    def first_images(self, count: int) -> torch.Tensor:
        """The first ``count`` images (evaluation view) as one float batch: shapes, examples, statistics."""
        return next(iter(self.subset(np.arange(min(count, len(self)))).loader(max(1, count))))[0]

    def loader(self, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
               drop_last: bool = False, device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1)) -> "DatasetLoader":
        return DatasetLoader(self, batch_size, shuffle=shuffle, augment=augment, seed=seed, drop_last=drop_last,
                             device=device, shard=shard)


class DatasetLoader:
    """Batches ``(float images in [0, 1], labels)`` of a :class:`DatasetPart`, with the interface of
    :class:`~cpq_lib.data.TensorBatchLoader` (``set_epoch``, ``len``, re-iterable).

    ``shard=(rank, world)``: each global batch of ``batch_size`` items is cut into ``world`` nearly equal
    pieces and this loader yields piece ``rank`` (distributed training: every rank steps through the same
    global batches).
    """

    def __init__(self, part: DatasetPart, batch_size: int, *, shuffle: bool = False, augment: bool = False, seed: int = 0,
                 drop_last: bool = False, device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1)) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size must be an integer >= 1, got {batch_size!r}")
        rank, world = shard
        if not 0 <= rank < world:
            raise DataError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
        if world > batch_size:
            raise DataError(f"a global batch of {batch_size} cannot be split between {world} ranks")
        self.part = part
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = augment
        self.seed = seed
        self.drop_last = drop_last
        self.device = torch.device(device)
        self.shard = (rank, world)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        n = len(self.part)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def _batches(self) -> list[list[tuple[int, int]]]:
        """The epoch's batches for this rank: lists of (item index, item seed)."""
        generator = torch.Generator().manual_seed(self.seed * SEED_STRIDE + self.epoch)
        n = len(self.part)
        order = torch.randperm(n, generator=generator) if self.shuffle else torch.arange(n)
        positions = order[: len(self) * self.batch_size].numpy()
        items = self.part.indices[positions]
        if self.augment:  # one seed per item of the epoch, drawn after the order: independent of workers and ranks
            seeds = torch.randint(0, 2**62, (len(positions),), generator=generator).numpy()
        else:
            seeds = np.full(len(positions), -1, dtype=np.int64)
        rank, world = self.shard
        batches = []
        for start in range(0, len(positions), self.batch_size):
            chunk = np.array_split(np.arange(start, min(start + self.batch_size, len(positions))), world)[rank]
            batches.append([(int(items[i]), int(seeds[i])) for i in chunk])
        return batches

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        view = self.part.augmented if self.augment and self.part.augmented is not None else self.part.dataset
        loader = DataLoader(_Seeded(view), batch_sampler=self._batches(), num_workers=self.part.workers,
                            pin_memory=self.part.pin_memory and self.device.type == "cuda")
        dtype = torch.get_default_dtype()
        for images, labels in loader:
            if not isinstance(images, torch.Tensor) or images.dim() != 4:
                raise DataError(f"a data set item must be (image tensor C x H x W, label); got a batch of "
                                f"{type(images).__name__} {getattr(images, 'shape', '')}: add a transform that "
                                f"ends in ToTensor() and gives every image one size")
            images = images.to(dtype)
            labels = torch.as_tensor(labels, dtype=torch.long)
            if self.device.type != "cpu":
                images = images.to(self.device, non_blocking=True)
                labels = labels.to(self.device, non_blocking=True)
            yield images, labels
