"""Data sets by name, with deterministic splits and fast in-memory loaders.

``load_dataset("digits")`` needs nothing; ``load_dataset("cifar10", root=...)`` reads a torchvision
root, an image-folder tree or a zip of one. The validation split is a stratified fraction of the
training data chosen by a recorded seed; the test split is only for final reports.
"""

from __future__ import annotations

import os

import torch
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import DataError
from .cache import cache_dir
from .loaders import Augment, TensorBatchLoader, random_crop_flip
from .sources import CIFAR10_CLASSES, ImageTensors, SourceData, read_digits, read_image_folder, read_torchvision_cifar
from .splits import indices_digest, stratified_sample, stratified_split

DATASETS = ("digits", "cifar10", "cifar100", "imagefolder")
DIGITS_TEST_FRACTION = 0.2
DIGITS_TEST_SEED = 0  # fixed: the digits test part must never change between runs
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}
EXPECTED_CLASS_COUNT = {"cifar10": 10, "cifar100": 100}

__all__ = [
    "Augment", "DataBundle", "SearchData", "DATASETS", "ImageTensors", "TensorBatchLoader", "cache_dir", "load_dataset",
    "random_crop_flip", "stratified_split",
]


@dataclass
class DataBundle:
    """Train / validation / test parts of one data set plus everything a later stage must reproduce."""

    name: str
    classes: list[str]
    train: ImageTensors
    val: ImageTensors
    test: ImageTensors
    split_seed: int
    val_fraction: float
    augment: Augment
    source: dict = field(default_factory=dict)
    val_digest: str = ""

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def in_channels(self) -> int:
        return int(self.train.images.shape[1])

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.train.images.shape[2]), int(self.train.images.shape[3])

    def channel_stats(self) -> tuple[list[float], list[float]]:
        """Per-channel mean and std of the training part, in [0, 1] units (for input normalisation)."""
        pixels = self.train.images.double().div_(255.0)  # float64: the rounded stats must not depend on the kernels
        mean = pixels.mean(dim=(0, 2, 3))
        std = pixels.std(dim=(0, 2, 3)).clamp_min(1e-3)
        return [round(float(v), 4) for v in mean], [round(float(v), 4) for v in std]

    def part(self, name: str) -> ImageTensors:
        if name not in ("train", "val", "test"):
            raise DataError(f"unknown split {name!r}; allowed: train, val, test")
        return getattr(self, name)

    def sizes(self) -> dict[str, int]:
        return {"train": len(self.train), "val": len(self.val), "test": len(self.test)}

    def train_loader(self, batch_size: int, seed: int, augment: bool = True,
                     device: str | torch.device = "cpu") -> TensorBatchLoader:
        """Shuffled, augmented training batches made on ``device`` (on CUDA from images kept there)."""
        return TensorBatchLoader(self.train, batch_size, shuffle=True, augment=self.augment if augment else None, seed=seed,
                                 device=device)

    def eval_loader(self, split: str, batch_size: int = 500, device: str | torch.device = "cpu") -> TensorBatchLoader:
        return TensorBatchLoader(self.part(split), batch_size, device=device)

    def per_class_loader(self, per_class: int, split: str = "train", seed: int = 0, batch_size: int = 250) -> TensorBatchLoader:
        """``per_class`` images of every class (fewer if a class has fewer), for class-importance scoring."""
        data = self.part(split)
        index = stratified_sample(data.labels.numpy(), per_class, None, seed, self.num_classes)
        return TensorBatchLoader(data.subset(index), batch_size)

    def calibration_loader(self, total: int, seed: int = 0, batch_size: int = 256) -> TensorBatchLoader:
        """A small stratified subset of the *training* part for calibrating quantizers."""
        index = stratified_sample(self.train.labels.numpy(), None, total, seed, self.num_classes)
        return TensorBatchLoader(self.train.subset(index), batch_size)

    def subset(self, split: str, total: int | None, seed: int = 0) -> ImageTensors:
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
) -> DataBundle:
    """Load a data set by name and split it deterministically into train / val / test."""
    if name not in DATASETS:
        raise DataError(f"unknown data set {name!r}; allowed: {', '.join(DATASETS)}")
    if isinstance(split_seed, bool) or not isinstance(split_seed, int) or split_seed < 0:
        raise DataError(f"split_seed must be a non-negative integer, got {split_seed!r}")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0.0 < val_fraction < 1.0:
        raise DataError(f"val_fraction must be a number in (0, 1), got {val_fraction!r}")
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
    keep, held = stratified_split(train_all.labels.numpy(), val_fraction, split_seed)
    return DataBundle(
        name=name, classes=list(source.classes), train=train_all.subset(keep), val=train_all.subset(held), test=test,
        split_seed=split_seed, val_fraction=val_fraction, augment=augment, source=source.source, val_digest=indices_digest(held),
    )


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
