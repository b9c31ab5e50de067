"""A generated ImageNet-style folder: smoke tests and memory benchmarks of the lazy data path without ImageNet.

Every class has its own colour and stripe direction under per-image noise, so a small network learns
it within an epoch or two; sizes and aspect ratios vary from image to image as in ImageNet, which the
in-memory readers refuse and the lazy reader's transforms handle.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from ..errors import DataError


def _image(label: int, classes: int, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    hue = 2 * np.pi * label / classes
    colour = 127 + 100 * np.array([np.cos(hue), np.cos(hue - 2.1), np.cos(hue + 2.1)])
    angle = np.pi * (label % 4) / 4
    y, x = np.mgrid[0:height, 0:width] / max(height, width)
    stripes = np.sin(2 * np.pi * 6 * (x * np.cos(angle) + y * np.sin(angle)) + rng.uniform(0, 2 * np.pi))
    pixels = colour[None, None, :] + 60 * stripes[..., None] + rng.normal(0, 25, (height, width, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


def write_image_folder(root: str | os.PathLike, classes: int = 10, per_class: int = 24, test_per_class: int = 6,
                       sizes: tuple[int, int] = (64, 300), seed: int = 0, test_folder: str = "val",
                       image_format: str = "JPEG") -> Path:
    """Write ``root/train/<class>/*.jpg`` and ``root/<test_folder>/<class>/*.jpg`` (sides drawn from
    ``sizes``, independently for height and width; equal bounds give one size). Returns ``root``."""
    low, high = sizes
    if not 1 <= low <= high:
        raise DataError(f"sizes must be (low, high) with 1 <= low <= high, got {sizes!r}")
    if classes < 2 or per_class < 1 or test_per_class < 1:
        raise DataError(f"need at least 2 classes and 1 image per class and split, got {classes}, {per_class}, {test_per_class}")
    from PIL import Image

    rng = np.random.default_rng(seed)
    root = Path(root)
    suffix = ".jpg" if image_format.upper() == "JPEG" else f".{image_format.lower()}"
    for split, count in (("train", per_class), (test_folder, test_per_class)):
        for label in range(classes):
            folder = root / split / f"class{label:03d}"
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                height, width = (int(v) for v in rng.integers(low, high + 1, size=2))
                Image.fromarray(_image(label, classes, height, width, rng)).save(folder / f"{index:05d}{suffix}", image_format)
    return root
