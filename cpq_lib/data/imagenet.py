"""ImageNet-style image folders read lazily: the ``imagenet`` data set.

A root holds ``train/<class>/*`` and ``val/<class>/*`` (ImageNet's layout once its validation images are
sorted into class folders; ``test/<class>/*`` is read where there is no ``val/``), a zip of such a tree,
or a root prepared by ``torchvision.datasets.ImageNet`` (it has ``meta.bin``; class names are then the
synsets' words). Images may have any size and any format PIL reads; torchvision decodes them one batch
at a time with the standard transforms: training ``RandomResizedCrop(size)`` + horizontal flip,
evaluation ``Resize(size * 256 / 224)`` + ``CenterCrop(size)``, both ending in ``ToTensor()`` (pixels in
[0, 1]; the model normalises with ImageNet's mean and std, kept in the checkpoint).

The folder called ``val/`` is ImageNet's official validation set: here it is the **test** split, read
once for the final report; searches and calibrations use a validation split held out of ``train/``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path

from ..errors import DataError
from ..fileio import sha256_file
from .archive import extract_zip_once
from .cache import cache_dir
from .sources import IMAGE_SUFFIXES
from .streaming import DatasetPart

IMAGENET_MEAN = (0.485, 0.456, 0.406)  # torchvision's ImageNet weights were trained with these
IMAGENET_STD = (0.229, 0.224, 0.225)
RESIZE_RATIO = 256 / 224                 # evaluation: resize the short side to size * 256/224, centre-crop size


def imagenet_transforms(image_size: int):
    """(training transform, evaluation transform) for square crops of ``image_size`` pixels."""
    from torchvision import transforms

    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 8:
        raise DataError(f"image_size must be an integer >= 8 (pixels of the square crop), got {image_size!r}")
    train = transforms.Compose([transforms.RandomResizedCrop(image_size), transforms.RandomHorizontalFlip(),
                                transforms.ToTensor()])
    evaluation = transforms.Compose([transforms.Resize(round(image_size * RESIZE_RATIO)), transforms.CenterCrop(image_size),
                                     transforms.ToTensor()])
    return train, evaluation


def _split_root(root: Path) -> Path:
    """The folder holding ``train/`` and ``val/`` (or ``test/``): ``root`` or its one wrapper folder."""
    def has_splits(folder: Path) -> bool:
        return (folder / "train").is_dir() and ((folder / "val").is_dir() or (folder / "test").is_dir())

    if has_splits(root):
        return root
    children = [c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")] if root.is_dir() else []
    if len(children) == 1 and has_splits(children[0]):
        return children[0]
    raise DataError(f"{root} is not an ImageNet-style root: expected train/<class>/* and val/<class>/* (or test/<class>/*) "
                    f"directly under it or under a single wrapper folder")


def _image_folder(folder: Path, transform):
    from torchvision import datasets

    try:
        return datasets.ImageFolder(str(folder), transform=transform,
                                    is_valid_file=lambda p: Path(p).suffix.lower() in IMAGE_SUFFIXES)
    except (FileNotFoundError, RuntimeError) as exc:
        raise DataError(f"cannot read image folder {folder}: {exc}") from exc


def read_imagenet_folder(root: str | os.PathLike, image_size: int = 224, workers: int = 0,
                         pin_memory: bool = False) -> tuple[DatasetPart, DatasetPart, list[str], dict]:
    """(training part, test part, class names, provenance) of an ImageNet-style root (see the module doc)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise DataError(f"data root {root} does not exist; give an ImageNet-style folder (train/, val/) or a zip of one")
    train_tf, eval_tf = imagenet_transforms(image_size)
    source: dict = {"kind": "image_folder_lazy", "path_name": root.name, "image_size": image_size,
                    "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}
    if root.is_file():
        if root.suffix.lower() != ".zip":
            raise DataError(f"data root {root} is a file but not a .zip archive")
        source["sha256"] = sha256_file(root)
        root = extract_zip_once(root, cache_dir())
    if (root / "meta.bin").is_file():  # prepared by torchvision.datasets.ImageNet
        from torchvision import datasets

        train_eval = datasets.ImageNet(str(root), split="train", transform=eval_tf)
        test = datasets.ImageNet(str(root), split="val", transform=eval_tf)
        classes = [names[0] for names in train_eval.classes]
        source["layout"] = "torchvision ImageNet"
    else:
        folder = _split_root(root)
        train_eval = _image_folder(folder / "train", eval_tf)
        test_folder = folder / "val" if (folder / "val").is_dir() else folder / "test"
        test = _image_folder(test_folder, eval_tf)
        if test.classes != train_eval.classes:
            raise DataError(f"class folders differ between train ({train_eval.classes[:5]}...) and {test_folder.name} "
                            f"({test.classes[:5]}...) under {folder}")
        classes = list(train_eval.classes)
        source["layout"] = f"train/ + {test_folder.name}/"
    train_augmented = copy.copy(train_eval)  # the same file list, the training transform
    train_augmented.transform = train_tf
    train = DatasetPart(train_eval, augmented=train_augmented, workers=workers, pin_memory=pin_memory)
    test_part = DatasetPart(test, workers=workers, pin_memory=pin_memory)
    if len(train) == 0 or len(test_part) == 0:
        raise DataError(f"no images under {root} (train: {len(train)}, test: {len(test_part)})")
    return train, test_part, classes, source
