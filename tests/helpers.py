"""Small builders for test inputs (image-folder trees, zips)."""

from __future__ import annotations

import zipfile
from pathlib import Path

import numpy as np
from PIL import Image


def make_image_folder(root: Path, classes=("cat", "dog", "eel"), per_class=(6, 2), size=(8, 8), wrapper: str | None = None,
                      seed: int = 0) -> Path:
    """train/<class>/*.png and test/<class>/*.png with distinct random pixels; returns the tree's top."""
    rng = np.random.default_rng(seed)
    top = root / wrapper if wrapper else root
    for split, count in zip(("train", "test"), per_class):
        for name in classes:
            folder = top / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for index in range(count):
                pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(folder / f"{index:04d}.png")
    return root


def zip_folder(folder: Path, archive: Path) -> Path:
    with zipfile.ZipFile(archive, "w") as handle:
        for path in sorted(folder.rglob("*")):
            handle.write(path, path.relative_to(folder).as_posix())
    return archive
