"""Critical paths per class, the unimportant set, class similarity and the class ordering.

A path is a boolean mask per layer (classes x channels). Class c keeps its top ``1 - sparsity`` of
channels by score: with a per-class threshold every class keeps the same number of channels (ties
broken by channel order, so the result is deterministic); with a shared threshold one score cut-off
applies to all classes (classes with higher scores keep more). ``scope="layer"`` ranks within each
layer, ``scope="model"`` over all scored channels at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from ..errors import CpqError
from .analysis import total_similarity
from .scoring import ClassScores

UNIMPORTANT = "(unimportant)"
THRESHOLDS = ("per_class", "shared")
SCOPES = ("layer", "model")


class PathError(CpqError):
    """Bad path settings."""


@dataclass
class CriticalPaths:
    masks: dict[str, torch.Tensor]  # layer -> bool (classes, channels)
    class_names: list[str]
    settings: dict = field(default_factory=dict)

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def flat(self) -> torch.Tensor:
        """(classes, all channels) boolean matrix, layers concatenated in order."""
        return torch.cat([m for m in self.masks.values()], dim=1)

    def unimportant(self) -> dict[str, torch.Tensor]:
        """Per layer, the channels on no class's path."""
        return {name: ~mask.any(0) for name, mask in self.masks.items()}

    def path_sizes(self) -> pd.DataFrame:
        """Channels on each class's path, per layer (and the unimportant set)."""
        rows = []
        for name, mask in self.masks.items():
            for c, class_name in enumerate(self.class_names):
                rows.append({"layer": name, "class": class_name, "channels": int(mask[c].sum()), "of": mask.shape[1]})
            rows.append({"layer": name, "class": UNIMPORTANT, "channels": int((~mask.any(0)).sum()), "of": mask.shape[1]})
        return pd.DataFrame(rows)


def _top_k_mask(values: torch.Tensor, keep: int) -> torch.Tensor:
    """Bool mask of the ``keep`` largest entries along the last axis (ties: lower index first)."""
    order = torch.from_numpy(np.argsort(-values.numpy(), axis=-1, kind="stable"))
    mask = torch.zeros_like(values, dtype=torch.bool)
    mask.scatter_(-1, order[..., :keep], True)
    return mask


def critical_paths(scores: ClassScores, sparsity: float, threshold: str = "per_class", scope: str = "layer",
                   layers: list[str] | None = None) -> CriticalPaths:
    """Each class's critical path: its top ``1 - sparsity`` channels by score."""
    if not 0.0 <= sparsity < 1.0:
        raise PathError(f"sparsity must be in [0, 1), got {sparsity}")
    if threshold not in THRESHOLDS:
        raise PathError(f"unknown threshold {threshold!r}; allowed: {', '.join(THRESHOLDS)}")
    if scope not in SCOPES:
        raise PathError(f"unknown scope {scope!r}; allowed: {', '.join(SCOPES)}")
    names = layers or scores.layers
    unknown = [n for n in names if n not in scores.scores]
    if unknown:
        raise PathError(f"layer(s) {unknown[:5]} have no scores; scored layers: {scores.layers[:6]}...")
    groups = [[n] for n in names] if scope == "layer" else [names]
    masks: dict[str, torch.Tensor] = {}
    for group in groups:
        values = torch.cat([scores.scores[n].double() for n in group], dim=1)  # (classes, channels)
        keep = max(1, round((1.0 - sparsity) * values.shape[1]))
        if threshold == "per_class":
            mask = _top_k_mask(values, keep)
        else:
            cut = torch.sort(values.flatten(), descending=True).values[keep * values.shape[0] - 1]
            mask = values >= cut
        offset = 0
        for n in group:
            width = scores.scores[n].shape[1]
            masks[n] = mask[:, offset:offset + width].clone()
            offset += width
    return CriticalPaths(masks, list(scores.class_names),
                         {"sparsity": sparsity, "threshold": threshold, "scope": scope})


def jaccard_matrix(paths: CriticalPaths) -> torch.Tensor:
    """|P_i & P_j| / |P_i | P_j| over all channels (1 on the diagonal; 0 for two empty paths)."""
    flat = paths.flat().double()
    inter = flat @ flat.T
    sizes = flat.sum(1)
    union = sizes[:, None] + sizes[None, :] - inter
    return torch.where(union > 0, inter / union.clamp_min(1), torch.zeros_like(inter))


def interference_matrix(paths: CriticalPaths, scores: ClassScores, normalize: bool = False) -> torch.Tensor:
    """I[i, j] = summed score for class j of the channels on class i's path.

    ``normalize=True`` divides row i by the size of class i's path: the mean class-j score of a
    channel on class i's path, in [0, 1] (comparable across path sizes and models).
    """
    flat = paths.flat().double()
    values = torch.cat([scores.scores[n].double() for n in paths.masks], dim=1)
    interference = flat @ values.T
    return interference / flat.sum(1, keepdim=True).clamp_min(1) if normalize else interference


def class_order(similarity: torch.Tensor, class_names: list[str], descending: bool = True,
                unimportant_first: bool = True) -> list[str]:
    """Classes by total similarity to the others (self excluded), with the unimportant set as a pseudo-class.

    The pseudo-class goes first by default: its channels matter to no class, so a search lowers them first.
    """
    n = similarity.shape[0]
    if n != len(class_names):
        raise PathError(f"similarity is {n}x{n} but there are {len(class_names)} class names")
    total = total_similarity(similarity)
    index = sorted(range(n), key=lambda i: (-float(total[i]) if descending else float(total[i]), i))
    ordered = [class_names[i] for i in index]
    return [UNIMPORTANT, *ordered] if unimportant_first else [*ordered, UNIMPORTANT]


def path_overlap(paths: CriticalPaths) -> pd.DataFrame:
    """Per layer: mean pairwise Jaccard of the class paths and the share of channels on no path."""
    rows = []
    for name, mask in paths.masks.items():
        single = CriticalPaths({name: mask}, paths.class_names)
        jac = jaccard_matrix(single)
        n = jac.shape[0]
        off_diagonal = (jac.sum() - jac.diagonal().sum()) / max(1, n * (n - 1))
        rows.append({"layer": name, "mean_jaccard": float(off_diagonal),
                     "unimportant_share": float((~mask.any(0)).double().mean()),
                     "channels": mask.shape[1]})
    return pd.DataFrame(rows)
