"""Model checkpoints with a model card; loaded with ``weights_only=True`` and checked against the request.

A checkpoint is ``{"format", "card", "state_dict"}``. The card holds plain JSON-able values only
(model name and build arguments, data set and split, epochs, seed, accuracy, command), so the file
loads without unpickling arbitrary objects and the architecture can be rebuilt from it.
"""

from __future__ import annotations

import json
import os
import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError
from ..fileio import atomic_torch_save
from .registry import build_model

FORMAT = "cpq-checkpoint/1"


def save_checkpoint(model: nn.Module, path: str | os.PathLike, card: dict[str, Any]) -> None:
    """Write model weights and ``card`` atomically; ``card`` must name ``model`` and ``model_kwargs``."""
    for key in ("model", "model_kwargs"):
        if key not in card:
            raise CheckpointError(f"model card needs a {key!r} entry to rebuild the model; got keys {sorted(card)}")
    try:  # plain JSON values only, so a weights-only load can read the card back
        plain_card = json.loads(json.dumps(card, allow_nan=True))
    except (TypeError, ValueError) as exc:
        raise CheckpointError(f"model card must hold JSON values only: {exc}") from exc
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    atomic_torch_save({"format": FORMAT, "card": plain_card, "state_dict": state}, path)


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint file safely (tensors and plain containers only) or raise CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, pickle.UnpicklingError, EOFError, zipfile.BadZipFile, ValueError, OSError) as exc:
        raise CheckpointError(f"checkpoint {path} is corrupted or not a weights-only torch file: {exc}") from exc
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        found = payload.get("format") if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"checkpoint {path} has format {found!r}; expected {FORMAT!r}")
    card, state = payload.get("card"), payload.get("state_dict")
    if not isinstance(card, dict):
        raise CheckpointError(f"checkpoint {path} has no model card (a mapping under 'card'); it cannot be rebuilt")
    missing = [key for key in ("model", "model_kwargs") if key not in card]
    if missing:
        raise CheckpointError(f"checkpoint {path}: its model card lacks {missing}; it needs 'model' and 'model_kwargs'")
    if not isinstance(card["model_kwargs"], dict):
        raise CheckpointError(f"checkpoint {path}: the card's 'model_kwargs' must be a mapping, got {type(card['model_kwargs']).__name__}")
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointError(f"checkpoint {path} has no weights (a mapping of tensors under 'state_dict')")
    return payload


def load_checkpoint(
    path: str | os.PathLike, model: str | None = None, num_classes: int | None = None
) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model a checkpoint describes and load its weights; check name and class count if given."""
    payload = read_checkpoint(path)
    card = payload["card"]
    if model is not None and card["model"] != model:
        raise CheckpointError(f"checkpoint {path} holds model {card['model']!r}, not the requested {model!r}")
    kwargs = dict(card["model_kwargs"])
    if num_classes is not None and kwargs.get("num_classes") != num_classes:
        raise CheckpointError(
            f"class count mismatch: checkpoint {path} was trained for {kwargs.get('num_classes')} classes, "
            f"the data has {num_classes}"
        )
    network = build_model(card["model"], **kwargs)
    try:
        network.load_state_dict(payload["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"checkpoint {path} does not match architecture {card['model']!r}: {exc}") from exc
    network.eval()
    return network, card
