"""Data sets by name, with deterministic splits, in memory or read lazily.

``load_dataset("digits")`` needs nothing; ``load_dataset("cifar10", root=...)`` reads a torchvision
root, an image-folder tree or a zip of one, decoded once into memory (the fast path for small data
sets). ``load_dataset("imagenet", root=...)`` reads an ImageNet-style folder lazily, a batch at a time
(:mod:`cpq_lib.data.imagenet`), and :func:`bundle_from_datasets` wraps any ``torch.utils.data.Dataset``;
every stage reads either kind through the bundle's loaders. The validation split is a stratified
fraction of the training data chosen by a recorded seed; the test split is only for final reports.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import DataError
from .cache import cache_dir
from .loaders import Augment, TensorBatchLoader, random_crop_flip
from .streaming import DatasetLoader, DatasetPart, dataset_labels
from .sources import CIFAR10_CLASSES, ImageTensors, SourceData, read_digits, read_image_folder, read_torchvision_cifar
from .splits import indices_digest, stratified_sample, stratified_split

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder", "imagenet")
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed: the digits test part must never change between runs
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
EXPECTED_CLASS_COUNT = {"cifar10": 10, "cifar100": 100}

__all__ = [
    "Augment", "DataBundle", "DatasetLoader", "DatasetPart", "Part", "SearchData", "DATASETS", "ImageTensors",
    "TensorBatchLoader", "bundle_from_datasets", "cache_dir", "first_images", "load_dataset", "part_loader", "ready_batches",
    "random_crop_flip", "stratified_split",
]

Part = ImageTensors | DatasetPart  # one split: decoded in memory, or read lazily through a Dataset
STATS_IMAGES = 256  # training images a lazily read data set's channel statistics are estimated from


def part_loader(part: Part, batch_size: int, *, shuffle: bool = False, augment: Augment | None = None, seed: int = 0,
                device: str | torch.device = "cpu", shard: tuple[int, int] = (0, 1)) -> TensorBatchLoader | DatasetLoader:
    """Batches of ``part`` (float images in [0, 1], labels) whichever kind it is. ``augment``: the in-memory
    augmentation; a lazily read part augments with its own training view whenever ``augment`` is given."""
    if isinstance(part, ImageTensors):
        return TensorBatchLoader(part, batch_size, shuffle=shuffle, augment=augment, seed=seed, device=device, shard=shard)
    return part.loader(batch_size, shuffle=shuffle, augment=augment is not None, seed=seed, device=device, shard=shard)


READY_CACHE_BYTES = 2 * 2**30  # a lazily read subset read many times is kept in memory up to this size


class _StreamedBatches:
    """A lazily read part's batches, read again on every pass, moved to ``device`` in ``memory_format``."""

    def __init__(self, loader: DatasetLoader, device: torch.device, memory_format: torch.memory_format) -> None:
        self.loader, self.device, self.memory_format = loader, device, memory_format

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for images, labels in self.loader:
            yield images.to(self.device).contiguous(memory_format=self.memory_format), labels.to(self.device)


def _as_pixels(images: torch.Tensor) -> torch.Tensor:
    """``images`` as uint8 when they are exactly k/255 (what ToTensor gives), else as they are."""
    codes = images * 255.0
    rounded = codes.round()
    if torch.equal(codes, rounded) and float(rounded.min()) >= 0 and float(rounded.max()) <= 255:
        return rounded.to(torch.uint8)
    return images


def ready_batches(part: Part, batch_size: int, device: str | torch.device = "cpu",
                  memory_format: torch.memory_format = torch.contiguous_format, cache_bytes: int = READY_CACHE_BYTES):
    """Batches a stage reads many times (a search's validation subset, BatchNorm re-estimation images).

    In memory: float tensors made once, kept on ``device`` (a search evaluates hundreds of plans on
    them). Read lazily: decoded once and kept as pixels (uint8 where the images are ToTensor's k/255, 4x
    smaller than floats) when the subset fits in ``cache_bytes``, else a re-iterable that decodes on
    every pass. Either way memory does not grow with the data set, only with the subset."""
    device = torch.device(device)
    if isinstance(part, ImageTensors):
        return [(part.images[i:i + batch_size].to(torch.get_default_dtype()).div_(255.0).to(device).contiguous(memory_format=memory_format),
                 part.labels[i:i + batch_size].to(device)) for i in range(0, len(part), batch_size)]
    kept, size = [], 0
    for images, labels in part.loader(batch_size):
        pixels = _as_pixels(images)
        size += pixels.element_size() * pixels.numel()
        if size > cache_bytes:
            return _StreamedBatches(part.loader(batch_size), device, memory_format)
        kept.append((pixels, labels))
    return _KeptBatches([(pixels.to(device), labels.to(device)) for pixels, labels in kept], memory_format)


class _KeptBatches:
    """Decoded batches kept on their device as pixels, made float batch by batch on every pass."""

    def __init__(self, kept: list[tuple[torch.Tensor, torch.Tensor]], memory_format: torch.memory_format) -> None:
        self.kept, self.memory_format = kept, memory_format

    def __len__(self) -> int:
        return len(self.kept)

    def __iter__(self):
        dtype = torch.get_default_dtype()
        for pixels, labels in self.kept:
            images = pixels.to(dtype).div_(255.0) if pixels.dtype == torch.uint8 else pixels
            yield images.contiguous(memory_format=self.memory_format), labels


def first_images(part: Part, count: int) -> torch.Tensor:
    """The first ``count`` images of ``part`` as a float batch in [0, 1] (evaluation view): examples, shapes."""
    if isinstance(part, ImageTensors):
        return part.images[:count].to(torch.get_default_dtype()).div(255.0)
    return part.first_images(count)


@dataclass
class DataBundle:
    """Train / validation / test parts of one data set plus everything a later stage must reproduce."""

    name: str
    classes: list[str]
    train: Part
    val: Part
    test: Part
    split_seed: int
    val_fraction: float
    augment: Augment  # the in-memory augmentation; lazily read parts augment with their own training view
    source: dict = field(default_factory=dict)
    val_digest: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def streaming(self) -> bool:
        """Whether the parts are read lazily (through a Dataset) rather than held decoded in memory."""
        return not isinstance(self.train, ImageTensors)

    def _image_shape(self) -> tuple[int, ...]:
        if isinstance(self.train, ImageTensors):
            return tuple(self.train.images.shape[1:])
        if "_shape" not in self.__dict__:
            self.__dict__["_shape"] = tuple(first_images(self.train, 1).shape[1:])
        return self.__dict__["_shape"]

    @property
    def in_channels(self) -> int:
        return int(self._image_shape()[0])

    @property
    def image_size(self) -> tuple[int, int]:
        shape = self._image_shape()
        return int(shape[1]), int(shape[2])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training part, in [0, 1] units (for input normalisation).

        A lazily read data set uses the statistics its source names (ImageNet's), or estimates them on
        a seeded stratified sample of its training images."""
        if isinstance(self.train, ImageTensors):
            pixels = self.train.images.double().div_(255.0)  # float64: the rounded stats must not depend on the kernels
        elif "mean" in self.source and "std" in self.source:
            return [float(v) for v in self.source["mean"]], [float(v) for v in self.source["std"]]
        else:
            sample = self.subset("train", STATS_IMAGES, seed=0)
            pixels = torch.cat([images.double() for images, _ in part_loader(sample, 64)])
        mean = pixels.mean(dim=(0, 2, 3))
        std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]

    def example(self, count: int = 1, split: str = "val") -> torch.Tensor:
        """The first ``count`` images of ``split`` (float, in [0, 1]): what tracing and size metrics need."""
        return first_images(self.part(split), count)

    def part(self, name: str) -> Part:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; allowed: train, val, test")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def train_loader(self, batch_size: int, seed: int, augment: bool = True, device: str | torch.device = "cpu",
                     shard: tuple[int, int] = (0, 1)):
        """Shuffled, augmented training batches made on ``device`` (in memory on CUDA: from images kept
        there). ``shard=(rank, world)``: this rank's piece of every global batch of ``batch_size``."""
        return part_loader(self.train, batch_size, shuffle=True, augment=self.augment if augment else None, seed=seed,
                           device=device, shard=shard)

    def eval_loader(self, split: str, batch_size: int = 500, device: str | torch.device = "cpu",
                    shard: tuple[int, int] = (0, 1)):
        return part_loader(self.part(split), batch_size, device=device, shard=shard)

    def per_class_loader(self, per_class: int, split: str = "train", seed: int = 0, batch_size: int = 250):
        """``per_class`` images of every class (fewer if a class has fewer), for class-importance scoring."""
        data = self.part(split)
        index = stratified_sample(data.labels.numpy(), per_class, None, seed, self.num_classes)
        return part_loader(data.subset(index), batch_size)

    def calibration_loader(self, total: int, seed: int = 0, batch_size: int = 256):
        """A small stratified subset of the *training* part for calibrating quantizers (no augmentation)."""
        index = stratified_sample(self.train.labels.numpy(), None, total, seed, self.num_classes)
        return part_loader(self.train.subset(index), batch_size)

    def subset(self, split: str, total: int | None, seed: int = 0) -> Part:
        """A stratified subset of ``total`` images of ``split`` (all of it for None), in index order."""
        data = self.part(split)
        if total is None or total >= len(data):
            return data
        return data.subset(stratified_sample(data.labels.numpy(), None, total, seed, self.num_classes))

    def for_search(self) -> "SearchData":
        """A view without the test split, for bit searches and calibrations (see :class:`SearchData`)."""
        return SearchData(name=self.name, classes=list(self.classes), train=self.train, val=self.val, test=SEALED,
                          split_seed=self.split_seed, val_fraction=self.val_fraction, augment=self.augment,
                          source=dict(self.source), val_digest=self.val_digest)

    def describe(self) -> dict:
        """What a model card needs to rebuild exactly this split."""
        return {
            "name": self.name, "classes": list(self.classes), "split_seed": self.split_seed,
            "val_fraction": self.val_fraction, "sizes": self.sizes(), "val_digest": self.val_digest,
            "source": dict(self.source),
        }


def _read_source(name: str, root: str | os.PathLike | None, download: bool) -> SourceData:
    if name == "digits":
        return read_digits()
    if name == "imagefolder":
        if root is None:
            raise DataError("data set 'imagefolder' needs a root: an image-folder tree or a zip of one")
        return read_image_folder(root)
    # cifar10 / cifar100: detect what the root holds
    if root is None:
        root = cache_dir() / "torchvision"
        if not download and not (root / TORCHVISION_FOLDERS[name]).is_dir():
            raise DataError(
                f"no data root given for {name} and none cached under {root}; pass root=<zip | image-folder root | "
                f"torchvision root> or download=True on a connected machine"
            )
        return read_torchvision_cifar(name, Path(root), download)
    path = Path(root).expanduser()
    if not path.exists():
        raise DataError(f"data root {path} does not exist; give a zip, an image-folder root or a torchvision root for {name}")
    if path.is_dir() and (download or (path / TORCHVISION_FOLDERS[name]).is_dir()):
        return read_torchvision_cifar(name, path, download)
    others = [other for other, folder in TORCHVISION_FOLDERS.items() if other != name and (path / folder).is_dir()]
    if path.is_dir() and others:
        raise DataError(f"data root {path} holds {TORCHVISION_FOLDERS[others[0]]} ({others[0]}), not {name}'s "
                        f"{TORCHVISION_FOLDERS[name]}; ask for {others[0]!r} or give a root that holds {name}")
    return read_image_folder(path)


def load_dataset(
    name: str = "digits",
    root: str | os.PathLike | None = None,
    *,
    val_fraction: float = 0.1,
    split_seed: int = 0,
    download: bool = False,
    image_size: int = 224,
    workers: int = 0,
) -> DataBundle:
    """Load a data set by name and split it deterministically into train / val / test.

    ``image_size`` and ``workers`` concern the lazily read ``imagenet`` data set only: the side of its
    square crops and the DataLoader worker processes that decode them."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise DataError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
    if name == "imagenet":
        from .imagenet import read_imagenet_folder

        if root is None:
            raise DataError("data set 'imagenet' needs a root: a folder with train/<class>/* and val/<class>/* "
                            "(ImageNet's layout), a zip of one, or a root prepared by torchvision.datasets.ImageNet")
        train_all, test, classes, source_record = read_imagenet_folder(root, image_size, workers, pin_memory=True)  # pinned on CUDA only
        return _split_bundle(name, classes, train_all, test, val_fraction, split_seed, Augment(pad=0, flip=False), source_record)
    source = _read_source(name, root, download)
    expected = EXPECTED_CLASS_COUNT.get(name)
    if expected is not None and len(source.classes) != expected:
        raise DataError(f"{name} must have {expected} classes, but the data under {root} has {len(source.classes)}: {source.classes[:12]}")
    if name == "cifar10" and source.classes != CIFAR10_CLASSES:
        raise DataError(f"class folders {source.classes} do not match CIFAR-10's {CIFAR10_CLASSES}")
    train_all, test = source.train, source.test
    augment = Augment(pad=4, flip=True)
    if name == "digits":
        keep, held = stratified_split(train_all.labels.numpy(), DIGITS_TEST_FRACTION, DIGITS_TEST_SEED)
        train_all, test = train_all.subset(keep), train_all.subset(held)
        augment = Augment(pad=1, flip=False)  # digits are not mirror-symmetric
    elif name == "imagefolder":
        augment = Augment(pad=max(1, source.train.images.shape[2] // 8), flip=True)
    return _split_bundle(name, list(source.classes), train_all, test, val_fraction, split_seed, augment, source.source)


def _split_bundle(name: str, classes: list[str], train_all: Part, test: Part, val_fraction: float, split_seed: int,
                  augment: Augment, source: dict) -> DataBundle:
    """The bundle with a stratified validation split held out of ``train_all`` (seeded, recorded by digest)."""
    keep, held = stratified_split(train_all.labels.numpy(), val_fraction, split_seed)
    return DataBundle(
        name=name, classes=list(classes), train=train_all.subset(keep), val=train_all.subset(held), test=test,
        split_seed=split_seed, val_fraction=val_fraction, augment=augment, source=source, val_digest=indices_digest(held),
    )


def bundle_from_datasets(name: str, classes: Sequence[str], train: Dataset, test: Dataset, *, val: Dataset | None = None,
                         train_augmented: Dataset | None = None, val_fraction: float = 0.1, split_seed: int = 0,
                         workers: int = 0, mean: Sequence[float] | None = None,
                         std: Sequence[float] | None = None) -> DataBundle:
    """A bundle of your own ``torch.utils.data`` data sets, read lazily by every stage.

    Items are ``(image tensor C x H x W in [0, 1], label)`` of one size (a transform ending in
    ``ToTensor()``). ``train_augmented``: the same items as ``train`` with training augmentation (None:
    no augmentation). Without ``val``, a stratified ``val_fraction`` of ``train`` is held out (seeded by
    ``split_seed``); ``test`` is read only by final reports. ``mean``/``std``: the normalisation the model
    should apply (default: estimated on training images).
    """
    if len(classes) < 2:
        raise DataError(f"a classification data set needs at least 2 classes, got {list(classes)}")
    source: dict = {"kind": "datasets", "train": type(train).__name__}
    if (mean is None) != (std is None):
        raise DataError("give both mean and std, or neither")
    if mean is not None:
        source.update(mean=[float(v) for v in mean], std=[float(v) for v in std])
    train_part = DatasetPart(train, augmented=train_augmented, workers=workers)
    test_part = DatasetPart(test, workers=workers)
    labels = np.concatenate([train_part.labels.numpy(), test_part.labels.numpy()])
    if labels.size and (labels.min() < 0 or labels.max() >= len(classes)):
        raise DataError(f"labels must lie in 0..{len(classes) - 1} for {len(classes)} classes; found {labels.min()}..{labels.max()}")
    augment = Augment(pad=0, flip=False)
    if val is None:
        return _split_bundle(name, list(classes), train_part, test_part, val_fraction, split_seed, augment, source)
    val_part = DatasetPart(val, workers=workers)
    return DataBundle(name=name, classes=list(classes), train=train_part, val=val_part, test=test_part,
                      split_seed=split_seed, val_fraction=len(val_part) / (len(val_part) + len(train_part)),
                      augment=augment, source=source, val_digest=indices_digest(np.arange(len(val_part))) + "-given")


class SealedSplit:
    """Stands where the test split would be in a :class:`SearchData`: any use of it is an error."""

    def _refuse(self, *args, **kwargs):
        raise DataError("searches and calibrations see the training and validation splits only; the test split is "
                        "read once, in the final report (cpq_lib.pipeline.final_report)")

    __len__ = __iter__ = __getitem__ = _refuse

    def __getattr__(self, name: str):
        if name.startswith("__"):  # copy/pickle probing: behave like any object without that attribute
            raise AttributeError(name)
        self._refuse()

    def __repr__(self) -> str:
        return "SealedSplit()"


SEALED = SealedSplit()


class SearchData(DataBundle):
    """The data a bit search may use: training and validation parts. It holds no test images, so a search
    cannot read the test split, by construction; asking for it raises ``DataError``."""

    def part(self, name: str) -> ImageTensors:
        if name == "test":
            SEALED._refuse()
        return super().part(name)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val)}

    def for_search(self) -> "SearchData":
        return self
