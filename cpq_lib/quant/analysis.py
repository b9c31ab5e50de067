"""Quantization error of a quantized model's weights (pure: no data, no training)."""

from __future__ import annotations

import pandas as pd
import torch
from torch import nn

from .transform import quantized_layers


@torch.no_grad()
def weight_errors(model: nn.Module) -> pd.DataFrame:
    """Per quantized layer: relative weight error ||Q(w) - w|| / ||w|| and the number of scales."""
    rows = []
    for name, layer in quantized_layers(model):
        weight = layer.weight.detach()
        error = torch.linalg.vector_norm(layer.weight_quantizer(weight) - weight) / torch.linalg.vector_norm(weight).clamp_min(1e-12)
        rows.append({"layer": name, "relative_error": float(error), "scales": layer.weight_quantizer.scale.numel()})
    return pd.DataFrame(rows)
