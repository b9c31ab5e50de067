"""What every command line shares: argument types that reject bad values at parse time, output paths
checked before any work starts, profile overrides parsed as JSON, and errors printed as one line.

Argument types raise ``argparse.ArgumentTypeError``, so argparse prints ``error: argument --x: ...``
and exits with 2 before data or models are loaded.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Any, Callable


def integer_at_least(minimum: int) -> Callable[[str], int]:
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; give an integer >= {minimum}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def integer_between(low: int, high: int) -> Callable[[str], int]:
    at_least = integer_at_least(low)

    def parse(text: str) -> int:
        value = at_least(text)
        if value > high:
            raise argparse.ArgumentTypeError(f"{value} is not allowed; give an integer from {low} to {high}")
        return value

    parse.__name__ = f"integer in [{low}, {high}]"
    return parse


def positive_float(text: str) -> float:
    """A finite number > 0 (learning rates, temperatures): ``nan``, ``inf`` and ``-1`` are refused."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"{text} is not allowed; give a finite number > 0")
    return value


def parse_value(text: str) -> Any:
    """A ``--set`` value: JSON where it parses (numbers, lists, true/false/null), else the text itself."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """``["model.name=resnet32", "train.lr=0.1"]`` -> overrides; ValueError names a malformed item."""
    overrides = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--set expects KEY=VALUE (e.g. model.name=resnet32), got {item!r}")
        overrides[key] = parse_value(value)
    return overrides


def check_output_file(path: str | Path, option: str = "--out") -> Path:
    """A file to be written: not a folder, and no file where a parent folder must be."""
    path = Path(path)
    if path.is_dir():
        raise ValueError(f"{option} {path} is a folder; give a file path")
    _check_parents(path, option)
    return path


def check_output_folder(path: str | Path, option: str = "--out") -> Path:
    """A folder to be written: not a file, and no file where one of its parents must be."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{option} {path} is a file; give a folder")
    _check_parents(path, option)
    return path


def _check_parents(path: Path, option: str) -> None:
    """The nearest existing parent of ``path`` must be a folder (else its folders cannot be made)."""
    parent = next((p for p in path.parents if p.exists()), None)
    if parent is not None and not parent.is_dir():
        raise ValueError(f"{option} {path}: {parent} is a file, so the folder cannot be made there")


def fail(message: str) -> int:
    """Print ``error: message`` on stderr; the exit status of a command line refused on its input."""
    print(f"error: {message}", file=sys.stderr)
    return 2
