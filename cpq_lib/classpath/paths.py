"""Critical paths per class, the unimportant set, class similarity and the class ordering.

A path is a boolean mask per layer (classes x channels). Class c keeps its top ``1 - sparsity`` of
channels by score. ``ties="include"`` is the reference's rule (``gen_critical_pathway``): one score
threshold per class, ``sorted(pool)[-k]`` with ``k = int((1 - sparsity) * len(pool))``, and every channel
scoring at or above it is on the path, so ties at the threshold are all kept (scores saturate at 1.0
on a ResNet: a path can hold far more than ``1 - sparsity`` of the channels). ``ties="index"`` keeps
exactly the top k per class, ties broken by channel order (path membership then depends on channel
order: a named variant, not the method). With a shared threshold one cut-off applies to all classes
(the pool is every class's scores). ``scope="model"`` pools every scored channel at once (the
reference), ``scope="layer"`` ranks within each layer.
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
TIES = ("include", "index")


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


def _reference_cut(pool: torch.Tensor, sparsity: float) -> float:
    """The reference's threshold: ``sorted(pool)[-k]``, ``k = int((1 - sparsity) * len(pool))`` (k = 0 gives
    ``sorted(pool)[0]``, the minimum, as Python's ``[-0]`` does)."""
    keep = int((1 - sparsity) * pool.numel())
    ordered = torch.sort(pool.flatten()).values
    return float(ordered[-keep] if keep else ordered[0])


def critical_paths(scores: ClassScores, sparsity: float, threshold: str = "per_class", scope: str = "layer",
                   layers: list[str] | None = None, ties: str = "index") -> CriticalPaths:
    """Each class's critical path: its top ``1 - sparsity`` channels by score (see the module docstring)."""
    if ties not in TIES:
        raise PathError(f"unknown tie rule {ties!r}; allowed: {', '.join(TIES)}")
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
        if ties == "include" and threshold == "per_class":
            cuts = torch.tensor([_reference_cut(row, sparsity) for row in values], dtype=values.dtype)
            mask = values >= cuts[:, None]
        elif ties == "include":
            mask = values >= _reference_cut(values, sparsity)
        elif threshold == "per_class":
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
                         {"sparsity": sparsity, "threshold": threshold, "scope": scope, "ties": ties})


def random_paths(paths: CriticalPaths, seed: int) -> CriticalPaths:
    """The ablation of the class ingredient: every class's path replaced, layer by layer, by as many
    channels drawn at random (seeded), so per-layer path sizes are kept and only *which* channels goes."""
    generator = torch.Generator().manual_seed(seed)
    masks = {}
    for name, mask in paths.masks.items():
        drawn = torch.zeros_like(mask)
        for c in range(mask.shape[0]):
            size = int(mask[c].sum())
            drawn[c, torch.randperm(mask.shape[1], generator=generator)[:size]] = True
        masks[name] = drawn
    return CriticalPaths(masks, list(paths.class_names), {**paths.settings, "random_paths_seed": seed})


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


PLACEMENTS = ("first", "last", "swap")


def class_order(similarity: torch.Tensor, class_names: list[str], descending: bool = True,
                unimportant_first: bool = True, *, placement: str | None = None, loc: int | None = None,
                include_self: bool = False) -> list[str]:
    """Classes by total similarity, with the unimportant set as a pseudo-class.

    Totals exclude the diagonal unless ``include_self`` (the reference sums the whole row:
    ``sorted(range(C), key=sum(sim[i]))``; Jaccard's diagonal is 1 for every class, interference's is not).
    Ties keep class-index order (Python's stable sort). ``placement``: "first" (default; its channels
    matter to no class, so a search lowers them first), "last", or "swap" (the reference: append the
    pseudo-class, then swap it with the class at position ``loc``, which moves that class to the end;
    ``loc`` = C leaves it last).
    """
    n = similarity.shape[0]
    if n != len(class_names):
        raise PathError(f"similarity is {n}x{n} but there are {len(class_names)} class names")
    placement = placement or ("first" if unimportant_first else "last")
    if placement not in PLACEMENTS:
        raise PathError(f"unknown placement {placement!r}; allowed: {', '.join(PLACEMENTS)}")
    total = similarity.sum(1) if include_self else total_similarity(similarity)
    index = sorted(range(n), key=lambda i: -float(total[i]) if descending else float(total[i]))
    ordered = [class_names[i] for i in index]
    if placement == "first":
        return [UNIMPORTANT, *ordered]
    ordered.append(UNIMPORTANT)
    if placement == "swap":
        if loc is None or not 0 <= loc <= n:
            raise PathError(f"placement 'swap' needs loc in 0..{n} (the position the unimportant set takes), got {loc!r}")
        ordered[loc], ordered[n] = ordered[n], ordered[loc]
    return ordered


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
