"""Small builders for test inputs (image-folder trees, zips, models with non-trivial statistics)."""

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


def randomise_(model, seed: int = 0, biases: bool = False):
    """Non-trivial BatchNorm statistics and affine parameters, per-channel weight ranges that differ widely (and
    random biases), so a missed channel permutation shows; returns the model in eval mode."""
    import torch
    from torch import nn

    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.BatchNorm2d):
                c = module.num_features
                module.running_mean.copy_(torch.randn(c, generator=generator))
                module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
                module.weight.copy_(torch.randn(c, generator=generator))
                module.bias.copy_(torch.randn(c, generator=generator))
            elif isinstance(module, (nn.Conv2d, nn.Linear)):
                rows = module.weight.shape[0]
                module.weight.mul_(torch.exp(torch.randn(rows, generator=generator)).view(rows, *[1] * (module.weight.dim() - 1)))
                if biases and module.bias is not None:
                    module.bias.copy_(torch.randn(rows, generator=generator))
    return model.eval()


def allocator_params(names) -> list:
    """Allocator names as pytest params; one whose peer package is an optional dependency that is not
    installed here is skipped with the reason (the others run)."""
    import pytest

    from cpq_lib.allocation import OPTIONAL

    return [pytest.param(name, marks=pytest.mark.skipif(name in OPTIONAL and not OPTIONAL[name](),
                                                        reason=f"{name} needs its optional peer package (pip install -r benchmarks/requirements-peers.txt)"))
            for name in sorted(names)]


def installed_allocators(names) -> list[str]:
    """The allocators of ``names`` that can run here (optional peers installed)."""
    from cpq_lib.allocation import OPTIONAL

    return [name for name in sorted(names) if name not in OPTIONAL or OPTIONAL[name]()]
