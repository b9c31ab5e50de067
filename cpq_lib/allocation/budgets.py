"""BitOPs of a per-channel plan, as a linear function of the channel bit-widths.

A quantized layer's BitOPs are ``sum_c bits_c * MACs_per_channel * act_bits`` (the layer table's
definition, :func:`cpq_lib.quant.metrics.layer_table`); float layers add a constant ``MACs * 32 * 32``.
So a BitOPs budget is one more linear constraint on the bits, which the exact solver takes as it is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import quantized_layers
from ..quant.metrics import FLOAT_BITS, compute_layers, layer_calls
from .evaluator import SearchEvaluator


@dataclass(frozen=True)
class BitopsModel:
    per_weight_bit: torch.Tensor  # float64 over the channel space: BitOPs per sample per weight bit of the channel
    constant: float               # BitOPs per sample of the float layers

    def gbitops(self, bits: torch.Tensor) -> float:
        return (float((bits.double() * self.per_weight_bit).sum()) + self.constant) / 1e9


def bitops_model(evaluator: SearchEvaluator) -> BitopsModel:
    """The evaluator's model's BitOPs per sample, from one forward of one validation image."""
    model = evaluator.model
    calls = layer_calls(model, next(iter(evaluator.batches))[0][:1])
    quantized = dict(quantized_layers(model))
    per_layer = []
    for name in evaluator.space.names:
        layer = quantized[name]
        act = layer.activation_bits()
        per_channel = calls[name][1] / layer.weight.shape[0] * (act if act is not None else FLOAT_BITS)
        per_layer.append(torch.full((layer.weight.shape[0],), float(per_channel), dtype=torch.float64))
    constant = float(sum(calls[name][1] * FLOAT_BITS * FLOAT_BITS for name, _ in compute_layers(model) if name not in quantized))
    return BitopsModel(torch.cat(per_layer), constant)
