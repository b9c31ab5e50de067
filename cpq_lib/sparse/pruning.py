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
# a target: one sparsity for every layer, or (fnmatch pattern, sparsity) pairs: a layer takes the first
# pattern it matches; layers matching none are not pruned
Sparsity = float | tuple[tuple[str, float], ...]


def check_layer_sparsity(sparsity, where: str = "sparsity") -> Sparsity:
    """A number in [0, 1), or a mapping / pairs of fnmatch pattern -> number in [0, 1) (as a tuple of pairs)."""
    if isinstance(sparsity, dict):
        sparsity = tuple(sparsity.items())
    if not isinstance(sparsity, (tuple, list)):
        return check_sparsity(sparsity, where)
    pairs = []
    for item in sparsity:
        if not (isinstance(item, (tuple, list)) and len(item) == 2 and isinstance(item[0], str)):
            raise ValueError(f"{where}: per-layer sparsity must be (pattern, value) pairs, got {item!r}")
        pairs.append((item[0], check_sparsity(item[1], f"{where} for {item[0]!r}")))
    if not pairs:
        raise ValueError(f"{where}: no (pattern, value) pairs given")
    return tuple(pairs)


def layer_targets(layers: Sequence[tuple[str, nn.Module]], sparsity: Sparsity) -> dict[str, float]:
    """Each layer's sparsity under ``sparsity`` (see :data:`Sparsity`)."""
    if not isinstance(sparsity, tuple):
        return {name: float(sparsity) for name, _ in layers}
    return {name: next((value for pattern, value in sparsity if fnmatch.fnmatchcase(name, pattern)), 0.0) for name, _ in layers}


def scale_sparsity(sparsity: Sparsity, factor: float) -> Sparsity:
    """Every target times ``factor`` (a step of a gradual schedule towards it)."""
    if isinstance(sparsity, tuple):
        return tuple((pattern, value * factor) for pattern, value in sparsity)
    return sparsity * factor


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
def magnitude_prune_(model: nn.Module, sparsity: Sparsity, scope: str = "layer", exclude: Sequence[str] = ()) -> pd.DataFrame:
    """Prune the smallest-magnitude weights so that ``sparsity`` of them are zero, per layer or globally.

    ``sparsity`` is one number, or (pattern, sparsity) pairs / a dict giving layers their own targets
    (``scope="layer"`` only; layers matching no pattern are not pruned). Already pruned weights stay
    pruned (their magnitude is 0); returns :func:`sparsity_table`. Refuses a sparsity that would leave
    a layer without weights.
    """
    sparsity = check_layer_sparsity(sparsity)
    if scope not in SCOPES:
        raise ValueError(f"scope {scope!r} is not allowed; choose one of {list(SCOPES)}")
    if scope == "global" and isinstance(sparsity, tuple):
        raise ValueError("per-layer sparsities need scope='layer' (a global threshold has one target)")
    layers = prunable_layers(model, exclude)
    if not layers:
        raise ValueError("no Conv2d / Linear layer to prune (check exclude)")
    magnitudes = {name: module.weight.detach().abs() for name, module in layers}
    if scope == "layer":
        targets = layer_targets(layers, sparsity)
        masks = {name: _smallest_mask(m, round(targets[name] * m.numel())) for name, m in magnitudes.items()}
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


def cubic_factors(steps: int) -> list[float]:
    """The cubic schedule's share of the final sparsity after each of ``steps`` steps (from 0): 1 - (1 - k / steps)^3."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    return [1 - (1 - k / steps) ** 3 for k in range(1, steps + 1)]


def cubic_schedule(final: float, steps: int, initial: float = 0.0) -> list[float]:
    """Zhu & Gupta's gradual schedule: s_k = s_f + (s_i - s_f) (1 - k / steps)^3 for k = 1..steps."""
    final, initial = check_sparsity(final, "final sparsity"), check_sparsity(initial, "initial sparsity")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if initial > final:
        raise ValueError(f"initial sparsity {initial} is above the final {final}")
    return [final + (initial - final) * (1 - k / steps) ** 3 for k in range(1, steps + 1)]
