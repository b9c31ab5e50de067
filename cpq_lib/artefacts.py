"""Keys for cached and resumable artefacts: every one carries what made it, so nothing is reused blindly.

A run folder outlives the settings that filled it: a user changes ``--sparsity`` and reruns into the
same folder, or edits the code and resumes. An artefact (a stage checkpoint, a study's rows, cached
class scores, a trained baseline, an experiment's search) is therefore written with an
:class:`ArtefactKey` (its kind, every setting that changes its content, and a fingerprint of the code
that computes it) and read back only under an equal key. What happens on a mismatch depends on what
the artefact is:

* a **cache** (something cpq can remake) is recomputed: :func:`load_artefact` returns ``None``;
* a **result** a user asked for (a study CSV, an experiment record) is never overwritten:
  :func:`check_same_key` raises :class:`ArtefactMismatchError` naming both configurations.

The mechanism is written here, not taken from a library: joblib's ``Memory`` keys by function
arguments but pickles its results (cpq loads nothing untrusted) and cannot key resumable state
written in pieces.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any, Mapping, Sequence

import torch

from .errors import CpqError
from .fileio import atomic_torch_save, atomic_write_json
from .provenance import code_fingerprint

ARTEFACT_FORMAT = "cpq-artefact/1"


class ArtefactMismatchError(CpqError):
    """A result on disk was made with other settings or code than the run that would extend it."""


def canonical(value: Any) -> Any:
    """``value`` as plain JSON types, the same for equal settings (dataclasses, tuples, paths, dtypes)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return canonical(dataclasses.asdict(value))
    if isinstance(value, Mapping):
        return {str(k): canonical(v) for k, v in sorted(value.items(), key=lambda item: str(item[0]))}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    if isinstance(value, (set, frozenset)):
        return sorted(canonical(v) for v in value)
    if isinstance(value, float) and not math.isfinite(value):
        return repr(value)
    if isinstance(value, (bool, int, float, str)) or value is None:
        return value
    if isinstance(value, enum.Enum):
        return canonical(value.value)
    if isinstance(value, (PurePath, torch.dtype, torch.device)):
        return str(value)
    raise TypeError(f"artefact keys hold settings (numbers, strings, lists, dicts, dataclasses); got {type(value).__name__}")


@dataclass(frozen=True)
class ArtefactKey:
    """What made an artefact: its ``kind``, the ``settings`` that change its content, a code fingerprint."""

    kind: str
    settings: dict[str, Any]
    code: str

    @classmethod
    def make(cls, kind: str, settings: Mapping[str, Any], code: Sequence[str] = ()) -> "ArtefactKey":
        """``code``: the package parts (modules or subpackages) whose sources compute the artefact."""
        return cls(kind, canonical(settings), code_fingerprint(*code) if code else "")

    def extend(self, kind: str, settings: Mapping[str, Any]) -> "ArtefactKey":
        """The key of an artefact computed from this one (a later stage): it changes whenever this one does."""
        return ArtefactKey(kind, canonical({**self.settings, **settings, "from": self.kind}), self.code)

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "settings": self.settings, "code": self.code}

    @classmethod
    def from_dict(cls, value: Any) -> "ArtefactKey | None":
        """The key stored in a file, or None if there is none (written by an older version)."""
        if not isinstance(value, Mapping) or not {"kind", "settings", "code"} <= set(value):
            return None
        return cls(str(value["kind"]), canonical(value["settings"]), str(value["code"]))

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]


def state_fingerprint(model: torch.nn.Module) -> str:
    """Hash of a model's state (weights and buffers, their names and dtypes): the model an artefact starts from."""
    digest = hashlib.sha256()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        if tensor.dtype in (torch.bfloat16, torch.float16):
            tensor = tensor.view(torch.int16)  # numpy has no bfloat16: hash the bits
        digest.update(f"{key}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(tensor.numpy().tobytes())
    return digest.hexdigest()[:16]


def differences(recorded: ArtefactKey | None, wanted: ArtefactKey, limit: int = 8) -> list[str]:
    """Human-readable ``field: recorded -> wanted`` lines (the first ``limit``)."""
    if recorded is None:
        return ["the artefact carries no key (made by an older version or another tool)"]
    lines: list[str] = []
    if recorded.kind != wanted.kind:
        lines.append(f"kind: {recorded.kind!r} -> {wanted.kind!r}")
    _diff(recorded.settings, wanted.settings, "", lines)
    if recorded.code != wanted.code:
        lines.append(f"code fingerprint: {recorded.code} -> {wanted.code} (the code that computes it changed)")
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _diff(old: Any, new: Any, prefix: str, lines: list[str]) -> None:
    if isinstance(old, dict) and isinstance(new, dict):
        for field in sorted(set(old) | set(new)):
            _diff(old.get(field, "<absent>"), new.get(field, "<absent>"), f"{prefix}{field}.", lines)
    elif old != new:
        lines.append(f"{prefix.rstrip('.') or 'settings'}: {json.dumps(old)} -> {json.dumps(new)}")


def check_same_key(recorded: ArtefactKey | None, wanted: ArtefactKey, where: str | os.PathLike, remedy: str) -> None:
    """Refuse to extend a user's result made with other settings: the error names every difference."""
    if recorded == wanted:
        return
    listed = "; ".join(differences(recorded, wanted))
    raise ArtefactMismatchError(f"{where} was made with other settings than this run ({listed}); {remedy}")


def save_artefact(payload: Any, path: str | os.PathLike, key: ArtefactKey) -> None:
    """``torch.save`` of ``payload`` (tensors, numbers, lists, dicts) with its key, atomically."""
    atomic_torch_save({"format": ARTEFACT_FORMAT, "key": key.to_dict(), "payload": payload}, path)


def load_artefact(path: str | os.PathLike, key: ArtefactKey, map_location: Any = None) -> Any | None:
    """The payload stored at ``path`` under an equal key; None if absent, damaged or made otherwise."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        stored = torch.load(path, map_location=map_location, weights_only=True)
    except Exception:  # damaged or not ours: remake it  # noqa: BLE001
        return None
    if not isinstance(stored, dict) or stored.get("format") != ARTEFACT_FORMAT:
        return None
    return stored["payload"] if ArtefactKey.from_dict(stored.get("key")) == key else None


def write_key_file(path: str | os.PathLike, key: ArtefactKey) -> None:
    """A key beside an artefact that is not a torch file (a CSV): ``<path>.key.json``."""
    atomic_write_json(key.to_dict(), key_file(path))


def read_key_file(path: str | os.PathLike) -> ArtefactKey | None:
    try:
        return ArtefactKey.from_dict(json.loads(key_file(path).read_text(encoding="utf-8")))
    except (OSError, ValueError):
        return None


def key_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path.with_name(path.name + ".key.json")
