"""Deterministic stratified splits: a recorded seed rebuilds exactly the split a checkpoint never saw."""

from __future__ import annotations

import hashlib

import numpy as np
from sklearn.model_selection import train_test_split

from ..errors import DataError


def stratified_split(labels: np.ndarray, held_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split indices into (kept, held) with ``held_fraction`` of each class held out, sorted ascending."""
    if not 0.0 < held_fraction < 1.0:
        raise DataError(f"held-out fraction must be in (0, 1), got {held_fraction}")
    indices = np.arange(len(labels))
    kept, held = train_test_split(indices, test_size=held_fraction, stratify=labels, random_state=seed, shuffle=True)
    return np.sort(kept), np.sort(held)


def indices_digest(indices: np.ndarray) -> str:
    """Short fingerprint of an index set, stored in model cards to prove which split was held out."""
    return hashlib.sha256(np.asarray(indices, dtype=np.int64).tobytes()).hexdigest()[:16]


def stratified_sample(labels: np.ndarray, per_class: int | None, total: int | None, seed: int, num_classes: int) -> np.ndarray:
    """Indices of ``per_class`` images of every class (or ``total`` images stratified), seeded."""
    rng = np.random.default_rng(seed)
    if per_class is None and total is None:
        raise DataError("give per_class or total")
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if members.size == 0:
            raise DataError(f"class {label} has no images to sample from")
        take = per_class if per_class is not None else max(1, round(total * members.size / len(labels)))
        chosen.append(rng.permutation(members)[: min(take, members.size)])
    return np.sort(np.concatenate(chosen))
