"""Download CIFAR-10 (or CIFAR-100) with torchvision into a folder that `--data-root` then reads.

    .venv/bin/python scripts/get_cifar10.py data/cifar10            # then: --data-root data/cifar10
    .venv/bin/python scripts/get_cifar10.py data/cifar100 --name cifar100

torchvision fetches the official archives (about 170 MB each) and checks their MD5 sums; cpq reads the
resulting torchvision root directly. On a machine without internet, copy such a folder (or a zip of
an image-folder tree) over instead.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def download(root: Path, name: str = "cifar10") -> Path:
    from torchvision import datasets

    cls = {"cifar10": datasets.CIFAR10, "cifar100": datasets.CIFAR100}[name]
    root.mkdir(parents=True, exist_ok=True)
    for train in (True, False):
        cls(str(root), train=train, download=True)
    return root


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("root", type=Path, help="folder to download into (a torchvision root)")
    parser.add_argument("--name", choices=("cifar10", "cifar100"), default="cifar10")
    args = parser.parse_args(argv)
    try:
        download(args.root, args.name)
    except Exception as exc:  # torchvision raises URLError, RuntimeError (bad checksum), OSError
        print(f"error: downloading {args.name} into {args.root} failed: {exc}", file=sys.stderr)
        return 1
    print(f"{args.name} is in {args.root}; pass --data-root {args.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
