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
    classes, counts = np.unique(labels, return_counts=True)
    held_total = int(np.ceil(held_fraction * len(labels)))  # scikit-learn's rounding of test_size
    kept_total = len(labels) - held_total
    if counts.size and counts.min() < 2:
        raise DataError(f"class {classes[counts.argmin()].item()!r} has {counts.min()} image(s); a stratified split needs at least 2 per class")
    if held_total < classes.size or kept_total < classes.size:
        raise DataError(f"a stratified split of {len(labels)} images into {kept_total} + {held_total} (fraction {held_fraction}) "
                        f"cannot give each of the {classes.size} classes an image on both sides; "
                        f"use more images or a fraction nearer 0.5")
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
    for name, value in (("per_class", per_class), ("total", total)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1):
            raise DataError(f"{name} must be a positive integer number of images, got {value!r}")
    chosen = []
    for label in range(num_classes):
        members = np.flatnonzero(labels == label)
        if members.size == 0:
            raise DataError(f"class {label} has no images to sample from")
        take = per_class if per_class is not None else max(1, round(total * members.size / len(labels)))
        chosen.append(rng.permutation(members)[: min(take, members.size)])
    return np.sort(np.concatenate(chosen))
