"""Sensitivity: validation accuracy drop and loss rise when one layer, or one class path, is lowered.

Everything else stays at the reference bit-width. Uses the validation split only: sensitivities
feed bit searches, which must never see the test split.
"""

from __future__ import annotations

import copy
from typing import Iterable, Sequence

import pandas as pd
import torch
from torch import nn

from ..progress import progress as progress_bar
from ..quant.bitplan import BitPlan
from ..quant.transform import quantized_layers
from ..train import evaluate
from .paths import CriticalPaths


def _evaluate(model: nn.Module, data, device: str) -> tuple[float, float]:
    result = evaluate(model, data.eval_loader("val"), data.num_classes, device)
    return result.accuracy, result.loss


def _measure(model: nn.Module, data, reference: BitPlan, units: dict[str, dict[str, torch.Tensor]],
             bits: Sequence[int], kind: str, device: str, progress: bool) -> pd.DataFrame:
    reference.apply_(model)
    base_accuracy, base_loss = _evaluate(model, data, device)
    rows = []
    jobs = [(name, b) for name in units for b in bits]
    for name, b in progress_bar(jobs, progress, desc=f"{kind} sensitivity"):
        plan = copy.deepcopy(reference)
        for layer, channels in units[name].items():
            weights = torch.tensor(plan.layers[layer].weight)
            weights[channels] = b
            plan.layers[layer].weight = weights.tolist()
        plan.apply_(model)
        accuracy, loss = _evaluate(model, data, device)
        rows.append({"kind": kind, "unit": name, "bits": b, "accuracy": accuracy, "loss": loss,
                     "accuracy_drop": base_accuracy - accuracy, "loss_rise": loss - base_loss,
                     "channels": int(sum(int(c.sum()) for c in units[name].values()))})
    reference.apply_(model)
    return pd.DataFrame(rows)


def layer_sensitivity(model: nn.Module, data, bits: Sequence[int], reference_bits: int = 8,
                      device: str = "cpu", progress: bool = True) -> pd.DataFrame:
    """One row per (quantized layer, bits): that layer's weights at ``bits``, the rest at ``reference_bits``."""
    act = {n: layer.activation_bits() for n, layer in quantized_layers(model)}
    reference = BitPlan.uniform(model, reference_bits, None)
    for name, layer_bits in reference.layers.items():
        layer_bits.activation = act[name]
    units = {name: {name: torch.ones(layer.weight.shape[0], dtype=torch.bool)} for name, layer in quantized_layers(model)}
    return _measure(model, data, reference, units, bits, "layer", device, progress)


def path_sensitivity(model: nn.Module, data, paths: CriticalPaths, bits: Sequence[int], reference_bits: int = 8,
                     device: str = "cpu", progress: bool = True, classes: Iterable[str] | None = None) -> pd.DataFrame:
    """One row per (class, bits): the class path's channels in quantized layers at ``bits``."""
    layers = dict(quantized_layers(model))
    act = {n: layer.activation_bits() for n, layer in layers.items()}
    reference = BitPlan.uniform(model, reference_bits, None)
    for name, layer_bits in reference.layers.items():
        layer_bits.activation = act[name]
    chosen = list(classes) if classes is not None else paths.class_names
    units = {c: {n: paths.masks[n][paths.class_names.index(c)] for n in paths.masks if n in layers} for c in chosen}
    return _measure(model, data, reference, units, bits, "class path", device, progress)
