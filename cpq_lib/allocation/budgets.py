"""Budgets besides the average weight bits: BitOPs and bytes, both linear in the channel bit-widths.

A quantized layer's BitOPs are ``sum_c bits_c * MACs_per_channel * act_bits`` (the layer table's
definition, :func:`cpq_lib.quant.metrics.layer_table`); float layers add a constant ``MACs * 32 * 32``.
A model's stored size (:func:`cpq_lib.quant.metrics.model_size_bits`) is ``sum_c bits_c *
weights_per_channel`` plus what does not depend on the bits (scales, bit-width tables, biases, float
layers). So each budget is one more linear constraint ``sum_c per_bit[c] * bits[c] <= limit``, which the
exact solver takes as it is and every other allocator checks wherever it checks the average.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..quant import quantized_layers
from ..quant.metrics import FLOAT_BITS, compute_layers, layer_calls, model_size_bits
from .evaluator import SearchEvaluator
from .space import AllocationError, Target


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


@dataclass(frozen=True)
class SizeModel:
    per_weight_bit: torch.Tensor  # float64 over the channel space: stored bytes per weight bit of the channel
    constant: float               # bytes that do not depend on the bits (scales, tables, biases, float layers)

    def bytes(self, bits: torch.Tensor) -> float:
        return float((bits.double() * self.per_weight_bit).sum()) + self.constant


def size_model(evaluator: SearchEvaluator) -> SizeModel:
    """The evaluator's model's stored bytes as a function of the channel bits (its layout as it is now)."""
    space = evaluator.space
    per_bit = space.weights() / 8.0
    current = space.flatten({name: layer.weight_quantizer.bits.detach().cpu() for name, layer in evaluator.layers.items()})
    constant = model_size_bits(evaluator.model) / 8.0 - float((current.double() * per_bit).sum())
    return SizeModel(per_bit, constant)


@dataclass(frozen=True)
class ChannelBudget:
    """``sum_c per_bit[c] * bits[c] <= limit`` over the channel space; ``name`` says what is counted."""

    name: str
    per_bit: torch.Tensor
    limit: float

    def spent(self, bits: torch.Tensor) -> float:
        return float((bits.double() * self.per_bit).sum())

    def holds(self, bits: torch.Tensor) -> bool:
        return self.spent(bits) <= self.limit * (1 + 1e-12)


def extra_budgets(evaluator: SearchEvaluator, target: Target) -> list[ChannelBudget]:
    """The target's budgets besides the average weight bits (none for a bits-only target)."""
    budgets = []
    if target.max_gbitops is not None:
        model = bitops_model(evaluator)
        budgets.append(ChannelBudget("GBitOPs", model.per_weight_bit, target.max_gbitops * 1e9 - model.constant))
    if target.max_bytes is not None:
        model = size_model(evaluator)
        budgets.append(ChannelBudget("bytes", model.per_weight_bit, target.max_bytes - model.constant))
    for budget in budgets:
        if budget.limit < 0:
            raise AllocationError(f"the {budget.name} budget cannot be met: the layers the plan does not set "
                                  f"(full-precision layers, scales, tables) already spend more")
    return budgets


def within(budgets: list[ChannelBudget], bits: torch.Tensor) -> bool:
    """Whether ``bits`` keep every budget in ``budgets``."""
    return all(budget.holds(bits) for budget in budgets)


def check_spent(method: str, evaluator: SearchEvaluator, target: Target, bits: torch.Tensor) -> dict[str, float]:
    """What a returned plan spends of each extra budget; a plan above one is a bug (AssertionError)."""
    spent = {}
    if target.max_gbitops is not None:
        gbitops = bitops_model(evaluator).gbitops(bits)
        if gbitops > target.max_gbitops * (1 + 1e-9):
            raise AssertionError(f"{method} returned {gbitops:.6f} GBitOPs, above the budget {target.max_gbitops:.6f}")
        spent["gbitops"] = round(gbitops, 9)
    if target.max_bytes is not None:
        size = size_model(evaluator).bytes(bits)
        if size > target.max_bytes * (1 + 1e-9):
            raise AssertionError(f"{method} returned {size:.1f} bytes, above the budget {target.max_bytes:.1f}")
        spent["bytes"] = round(size, 3)
    return spent
