"""Checkpoints trained by this project and shipped inside the package (each with a JSON model card)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from torch import nn

from ..errors import CheckpointError
from .checkpoint import load_checkpoint

PRETRAINED_DIR = Path(__file__).parent / "pretrained"


def pretrained_path(model: str, dataset: str) -> Path:
    return PRETRAINED_DIR / f"{model}_{dataset}.pt"


def available_pretrained() -> list[tuple[str, str]]:
    return sorted(tuple(p.stem.rsplit("_", 1)) for p in PRETRAINED_DIR.glob("*.pt"))


def load_pretrained(model: str, dataset: str) -> tuple[nn.Module, dict[str, Any]]:
    """The shipped ``model`` trained on ``dataset`` and its model card."""
    path = pretrained_path(model, dataset)
    if not path.is_file():
        allowed = ", ".join(f"{m} on {d}" for m, d in available_pretrained()) or "none"
        raise CheckpointError(f"no shipped checkpoint for {model!r} on {dataset!r}; available: {allowed}")
    return load_checkpoint(path, model=model)


def pretrained_card(model: str, dataset: str) -> dict[str, Any]:
    """The JSON model card shipped beside the checkpoint."""
    return read_card(pretrained_path(model, dataset).with_suffix(".json"))


def read_card(path: Path) -> dict[str, Any]:
    """A model card from JSON, with errors that name the file."""
    if not path.is_file():
        raise CheckpointError(f"model card {path} does not exist")
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"model card {path} is not valid JSON: {exc}") from exc
    if not isinstance(card, dict):
        raise CheckpointError(f"model card {path} must hold a JSON object, got {type(card).__name__}")
    return card
