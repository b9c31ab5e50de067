"""Readers that turn every supported data source into the same in-memory uint8 tensors.

All data sets used here are small (at most 60,000 32x32 images, 184 MB as uint8), so holding them
decoded in memory makes an epoch bound by the model rather than by JPEG decoding or Python workers.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from filelock import FileLock

from ..progress import progress

from ..errors import DataError
from ..fileio import atomic_path, atomic_write_json, sha256_file
from .archive import extract_zip_once
from .cache import cache_dir

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
DECODED_FORMAT = 1


@dataclass
class ImageTensors:
    """Images as uint8 (N, C, H, W) with int64 labels (N,)."""

    images: torch.Tensor
    labels: torch.Tensor

    def __post_init__(self) -> None:
        if self.images.dtype != torch.uint8 or self.images.dim() != 4:
            raise DataError(f"images must be a uint8 (N, C, H, W) tensor, got {self.images.dtype} {tuple(self.images.shape)}")
        if self.labels.shape != (self.images.shape[0],):
            raise DataError(f"labels shape {tuple(self.labels.shape)} does not match {self.images.shape[0]} images")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def on(self, device: str | torch.device) -> "ImageTensors":
        """This data on ``device``; the copy is made once and kept (training reads it every epoch)."""
        device = torch.device(device)
        if self.images.device == device:
            return self
        copies = self.__dict__.setdefault("_copies", {})
        if str(device) not in copies:
            copies[str(device)] = ImageTensors(self.images.to(device), self.labels.to(device))
        return copies[str(device)]

    def subset(self, indices: np.ndarray | torch.Tensor) -> "ImageTensors":
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageTensors(self.images[index], self.labels[index])


@dataclass
class SourceData:
    """A data set as read from its source: the official train and test parts, class names, provenance."""

    train: ImageTensors
    test: ImageTensors
    classes: list[str]
    source: dict = field(default_factory=dict)


def read_digits() -> SourceData:
    """scikit-learn's bundled 8x8 digits (1,797 images, no download); the test part is made by the splitter."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    pixels = np.rint(bunch.images * (255.0 / 16.0)).astype(np.uint8)[:, None, :, :]
    everything = ImageTensors(torch.from_numpy(pixels), torch.from_numpy(bunch.target.astype(np.int64)))
    empty = ImageTensors(torch.zeros((0, 1, 8, 8), dtype=torch.uint8), torch.zeros(0, dtype=torch.long))
    return SourceData(everything, empty, [str(c) for c in bunch.target_names], {"kind": "sklearn", "name": "digits"})


def read_torchvision_cifar(name: str, root: Path, download: bool) -> SourceData:
    """CIFAR-10/100 through torchvision's own readers (its download path for connected machines)."""
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    try:
        parts = [cls(str(root), train=train, download=download) for train in (True, False)]
    except RuntimeError as exc:
        raise DataError(
            f"{name} not found under {root} ({exc}); pass a torchvision root that holds it, an image-folder "
            f"root, a zip of one, or set download=True on a connected machine"
        ) from exc
    tensors = [
        ImageTensors(torch.from_numpy(np.ascontiguousarray(p.data.transpose(0, 3, 1, 2))), torch.as_tensor(p.targets, dtype=torch.long))
        for p in parts
    ]
    return SourceData(tensors[0], tensors[1], list(parts[0].classes), {"kind": "torchvision", "name": name})


def find_split_root(root: Path) -> Path:
    """Return the folder holding ``train/`` and ``test/``: ``root`` itself or its one wrapper folder."""
    if (root / "train").is_dir() and (root / "test").is_dir():
        return root
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")] if root.is_dir() else []
    if len(children) == 1 and (children[0] / "train").is_dir() and (children[0] / "test").is_dir():
        return children[0]
    raise DataError(
        f"{root} is not an image-folder root: expected train/<class>/* and test/<class>/* directly under it "
        f"or under a single wrapper folder"
    )


def _list_images(split_dir: Path) -> tuple[list[str], list[tuple[Path, int]]]:
    classes = sorted(c.name for c in split_dir.iterdir() if c.is_dir() and not c.name.startswith("."))
    if not classes:
        raise DataError(f"{split_dir} has no class folders")
    items = []
    for label, name in enumerate(classes):
        files = sorted(p for p in (split_dir / name).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        items.extend((p, label) for p in files)
    return classes, items


def _listing_key(items: list[tuple[Path, int]], base: Path) -> str:
    digest = hashlib.sha256()
    for path, label in items:
        stat = path.stat()
        digest.update(f"{path.relative_to(base)}|{label}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _decode(items: list[tuple[Path, int]], desc: str) -> ImageTensors:
    from PIL import Image

    arrays, labels, sizes = [], [], set()
    for path, label in progress(items, desc=desc, unit="img", mininterval=1.0):
        try:
            with Image.open(path) as image:
                array = np.asarray(image.convert("RGB"))
        except OSError as exc:
            raise DataError(f"cannot decode image {path}: {exc}") from exc
        sizes.add(array.shape[:2])
        arrays.append(array)
        labels.append(label)
    if len(sizes) > 1:
        raise DataError(f"images under {desc} have different sizes {sorted(sizes)}; one size is required")
    if not arrays:
        raise DataError(f"no images found for {desc}")
    stacked = np.stack(arrays).transpose(0, 3, 1, 2).copy()
    return ImageTensors(torch.from_numpy(stacked), torch.tensor(labels, dtype=torch.long))


def read_image_folder(root: str | os.PathLike) -> SourceData:
    """An image-folder tree (``train/<class>/*``, ``test/<class>/*``) or a zip of one.

    Decoded pixels are cached as ``.npy`` in the cache folder, keyed by the zip's sha256 or by the
    folder's file listing, so the second read costs a memory map instead of 60,000 JPEG decodes.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist; give an image-folder root, a zip of one, or a torchvision root")
    source: dict = {"kind": "image_folder", "path_name": root.name}
    if root.is_file():
        if root.suffix.lower() != ".zip":
            raise DataError(f"data root {root} is a file but not a .zip archive")
        source["sha256"] = sha256_file(root)
        cached = _load_decoded(cache_dir() / "decoded" / source["sha256"][:16], None)
        if cached is not None:  # decoded before: the zip's checksum vouches for the content
            return SourceData(cached[0], cached[1], cached[2], source)
        folder = find_split_root(extract_zip_once(root, cache_dir()))
        key = source["sha256"]
    else:
        folder = find_split_root(root)
        key = None
    train_classes, train_items = _list_images(folder / "train")
    test_classes, test_items = _list_images(folder / "test")
    if train_classes != test_classes:
        raise DataError(f"class folders differ between train ({train_classes}) and test ({test_classes}) under {folder}")
    if key is None:
        key = _listing_key(train_items + test_items, folder)
        source["listing_sha256"] = key
    decoded = cache_dir() / "decoded" / key[:16]
    decoded.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(decoded.parent / f"{decoded.name}.lock")):  # one process decodes, the others wait and reuse
        cached = _load_decoded(decoded, train_classes)
        if cached is not None:
            return SourceData(cached[0], cached[1], train_classes, source)
        parts = (_decode(train_items, f"{root.name}/train"), _decode(test_items, f"{root.name}/test"))
        _save_decoded(decoded, parts, train_classes)
    return SourceData(parts[0], parts[1], train_classes, source)


def _save_decoded(folder: Path, parts: tuple[ImageTensors, ImageTensors], classes: list[str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for name, part in zip(("train", "test"), parts):
        for kind, tensor in (("images", part.images), ("labels", part.labels)):
            with atomic_path(folder / f"{name}_{kind}.npy") as tmp:
                with open(tmp, "wb") as handle:
                    np.save(handle, tensor.numpy())
    atomic_write_json({"format": DECODED_FORMAT, "classes": classes, "counts": [len(p) for p in parts]}, folder / "meta.json")


def _load_decoded(folder: Path, classes: list[str] | None) -> tuple[ImageTensors, ImageTensors, list[str]] | None:
    """The cached decoded parts, or None when absent, stale or damaged (then we decode again)."""
    meta_path = folder / "meta.json"
    if not meta_path.is_file():
        return None
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
        if meta.get("format") != DECODED_FORMAT or (classes is not None and meta.get("classes") != classes):
            return None
        parts = []
        for name, count in zip(("train", "test"), meta["counts"]):
            images = torch.from_numpy(np.load(folder / f"{name}_images.npy", allow_pickle=False))
            labels = torch.from_numpy(np.load(folder / f"{name}_labels.npy", allow_pickle=False))
            if len(labels) != count:
                return None
            parts.append(ImageTensors(images, labels))
    except (OSError, ValueError, KeyError, DataError):
        return None
    return parts[0], parts[1], list(meta["classes"])
