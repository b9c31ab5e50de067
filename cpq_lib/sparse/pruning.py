"""Fine-grained magnitude pruning on ``torch.nn.utils.prune``'s reparametrisation.

Masks live where torch puts them (``weight_mask`` buffers next to ``weight_orig``), so a pruned model's
``state_dict`` carries them and masked fine-tuning needs nothing special: the trainer's checkpoints
save and restore them, and :func:`prepare_masks_` gives a fresh model the same parameter layout
before such a state is loaded. We compute each mask ourselves (the smallest-magnitude entries of the
*current* effective weights, ties broken by position) and hand it to ``prune.custom_from_mask``:
torch's ``l1_unstructured`` prunes a fraction of what is left, which makes a target sparsity reached
over several steps depend on the step sizes; an exact count per step does not.
"""

from __future__ import annotations

import fnmatch
import math
from typing import Iterable, Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import prune

SCOPES = ("layer", "global")


def check_sparsity(sparsity: float, where: str = "sparsity") -> float:
    """``sparsity`` as a float in [0, 1), or a ValueError naming it."""
    if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not math.isfinite(sparsity) or not 0 <= sparsity < 1:
        raise ValueError(f"{where} must be a number in [0, 1), got {sparsity!r}")
    return float(sparsity)


def prunable_layers(model: nn.Module, exclude: Sequence[str] = ()) -> list[tuple[str, nn.Module]]:
    """Conv2d / Linear layers whose names match none of the fnmatch ``exclude`` patterns."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear)) and not any(fnmatch.fnmatchcase(name, p) for p in exclude)]


def _smallest_mask(magnitudes: torch.Tensor, count: int) -> torch.Tensor:
    """A keep-mask with the ``count`` smallest entries (ties by position) set to 0."""
    flat = magnitudes.flatten()
    order = torch.sort(flat, stable=True).indices
    mask = torch.ones_like(flat)
    mask[order[:count]] = 0.0
    return mask.view_as(magnitudes)


@torch.no_grad()
def magnitude_prune_(model: nn.Module, sparsity: float, scope: str = "layer", exclude: Sequence[str] = ()) -> pd.DataFrame:
    """Prune the smallest-magnitude weights so that ``sparsity`` of them are zero, per layer or globally.

    Already pruned weights stay pruned (their magnitude is 0); returns :func:`sparsity_table`. Refuses
    a sparsity that would leave a layer without weights.
    """
    sparsity = check_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not allowed; choose one of {list(SCOPES)}")
    layers = prunable_layers(model, exclude)
    if not layers:
        raise ValueError("no Conv2d / Linear layer to prune (check exclude)")
    magnitudes = {name: module.weight.detach().abs() for name, module in layers}
    if scope == "layer":
        masks = {name: _smallest_mask(m, round(sparsity * m.numel())) for name, m in magnitudes.items()}
    else:
        flat = torch.cat([m.flatten() for m in magnitudes.values()])
        keep = _smallest_mask(flat, round(sparsity * flat.numel()))
        masks, start = {}, 0
        for name, m in magnitudes.items():
            masks[name] = keep[start:start + m.numel()].view_as(m)
            start += m.numel()
    empty = [name for name, mask in masks.items() if not bool(mask.any())]
    if empty:
        raise ValueError(f"sparsity {sparsity} would leave layer(s) {empty[:3]} without weights; lower it or exclude them")
    for name, module in layers:
        prune.custom_from_mask(module, "weight", masks[name])
    return sparsity_table(model)


def prepare_masks_(model: nn.Module, names: Iterable[str]) -> nn.Module:
    """Give the named layers all-ones masks, so a pruned model's state dict loads into a fresh model."""
    modules = dict(model.named_modules())
    for name in names:
        module = modules[name]
        if not prune.is_pruned(module):
            prune.identity(module, "weight")
    return model


def pruned_names(state: dict) -> list[str]:
    """Layer names with a ``weight_mask`` in a state dict."""
    return [key[: -len(".weight_mask")] for key in state if key.endswith(".weight_mask")]


def make_permanent_(model: nn.Module) -> nn.Module:
    """Fold the masks into the weights (``prune.remove``): plain parameters with zeros where pruned."""
    for _, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)) and prune.is_pruned(module) and hasattr(module, "weight_mask"):
            prune.remove(module, "weight")
    return model


@torch.no_grad()
def sparsity_table(model: nn.Module) -> pd.DataFrame:
    """Per Conv2d / Linear layer: weights, zeros and sparsity of the effective weight; a 'total' row last."""
    rows = []
    for name, module in model.named_modules():
        if isinstance(module, (nn.Conv2d, nn.Linear)):
            weight = module.weight
            zeros = int((weight == 0).sum())
            rows.append({"layer": name, "weights": weight.numel(), "zeros": zeros, "sparsity": zeros / weight.numel()})
    total_weights, total_zeros = sum(r["weights"] for r in rows), sum(r["zeros"] for r in rows)
    rows.append({"layer": "total", "weights": total_weights, "zeros": total_zeros,
                 "sparsity": total_zeros / max(total_weights, 1)})
    return pd.DataFrame(rows)


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta's gradual schedule: s_k = s_f + (s_i - s_f) (1 - k / steps)^3 for k = 1..steps."""
    final, initial = check_sparsity(final, "final sparsity"), check_sparsity(initial, "initial sparsity")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if initial > final:
        raise ValueError(f"initial sparsity {initial} is above the final {final}")
    return [final + (initial - final) * (1 - k / steps) ** 3 for k in range(1, steps + 1)]
