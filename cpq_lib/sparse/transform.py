"""Put focused quantizers on a pruned model's layers (``torch.nn.utils.parametrize``) and take codes back out.

``focus_quantize_(model, bits)`` folds any pruning masks into the weights, then registers on each chosen
Conv2d / Linear a parametrization ``weight -> quantizer(weight * keep)``: pruned weights stay exactly
zero however the latent weights move during fine-tuning, and the quantizer holds a growing share of the
rest at their power-of-two levels (:func:`set_fraction_`, incremental quantization). The latent weight
(``parametrizations.weight.original``), the mask and the quantizer's layout are all in the state dict.
The quantizer sits at ``parametrizations.weight.0.weight_quantizer``: the trainer keeps learnable
quantizer scales (here the layer scale ``alpha``) out of weight decay by that name.
"""

from __future__ import annotations

from typing import Sequence

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize

from ..quant.transform import excluded_names
from .focused import DEFAULT_SEPARATION, FocusedWeightQuantizer
from .pruning import make_permanent_


class FocusedWeight(nn.Module):
    """Parametrization: the focused-quantized weight, zero where pruned."""

    def __init__(self, quantizer: FocusedWeightQuantizer, keep: torch.Tensor) -> None:
        super().__init__()
        self.weight_quantizer = quantizer
        self.register_buffer("keep", keep)
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def _cache_key(self, weight: torch.Tensor) -> tuple:
        """What the quantized weight depends on, by tensor identity and version (any in-place change shows)."""
        q = self.weight_quantizer
        tensors = (weight, self.keep, q.alpha, q.centres, q.spreads, q.exponent_range, q.component, q.held)
        return tuple((t.data_ptr(), t._version, tuple(t.shape)) for t in tensors)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        if self.training or torch.is_grad_enabled():
            self._cache = None
            return self.weight_quantizer(weight * self.keep)
        key = self._cache_key(weight)  # eval without gradients: the levels are computed once per weight state
        if self._cache is None or self._cache[0] != key:
            self._cache = (key, self.weight_quantizer(weight * self.keep))
        return self._cache[1]


def focused_layers(model: nn.Module) -> list[tuple[str, nn.Module, FocusedWeight]]:
    return [(name, module, module.parametrizations.weight[0]) for name, module in model.named_modules()
            if parametrize.is_parametrized(module, "weight") and isinstance(module.parametrizations.weight[0], FocusedWeight)]


def focus_quantize_(model: nn.Module, bits: int, separation_threshold: float = DEFAULT_SEPARATION, fraction: float = 1.0,
                    exclude: Sequence[str] = ("@first", "@last"), seed: int = 0, levels: str = "paper",
                    assignment: str = "argmax", hardware: bool = False) -> pd.DataFrame:
    """Focused-quantize every Conv2d / Linear not excluded; returns a table per layer (mode, separation, levels).

    ``levels``, ``assignment`` and ``hardware``: see :mod:`.focused` (the paper's level set, argmax or
    sampled components, power-of-two centres with tied spreads)."""
    make_permanent_(model)
    keep_float = excluded_names(model, exclude)
    chosen = [(name, module) for name, module in model.named_modules()
              if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in keep_float]
    if not chosen:
        raise ValueError("no Conv2d / Linear layer to quantize (check exclude)")
    quantizers = {}
    for name, module in chosen:  # plan every layer before changing any: a failure leaves the model as it was
        weight = module.weight.detach()
        try:
            quantizers[name] = FocusedWeightQuantizer(weight, bits, separation_threshold, seed, fraction, levels, assignment, hardware)
        except ValueError as exc:
            raise ValueError(f"layer {name!r}: {exc}") from exc
    for name, module in chosen:
        parametrize.register_parametrization(module, "weight", FocusedWeight(quantizers[name], (module.weight.detach() != 0).to(module.weight.dtype)))
    return focused_table(model)


def _input_bits(module: nn.Module) -> int | None:
    """The bits of a focused layer's input quantizer (:func:`cpq_lib.sparse.executor.quantize_focused_inputs_`), None for float inputs."""
    quantizer = module._modules.get("input_quantizer")
    return int(quantizer.bits) if quantizer is not None and quantizer.enabled else None


def focused_table(model: nn.Module) -> pd.DataFrame:
    """Per focused layer, its current layout: mode, separation of the last fit, centres, spreads, exponent range,
    level set and how often it was re-estimated."""
    rows = []
    for name, module, param in focused_layers(model):
        quantizer = param.weight_quantizer
        layout, mixture = quantizer.layout, quantizer.mixture
        rows.append({"layer": name, "focused": layout.focused, "separation": None if mixture is None else mixture.separation,
                     "centres": layout.centres, "spreads": layout.spreads, "e_min": layout.e_min, "e_max": layout.e_max,
                     "levels": quantizer.levels, "exponents": layout.exponents, "zero_level": layout.zero_level,
                     "refits": int(quantizer.refits), "nonzero": int((module.parametrizations.weight.original != 0).sum()),
                     "input_bits": _input_bits(module)})
    return pd.DataFrame(rows)


@torch.no_grad()
def set_fraction_(model: nn.Module, fraction: float) -> None:
    """Hold ``fraction`` of every focused layer's non-zero weights at their levels (largest magnitudes first)."""
    for _, module, param in focused_layers(model):
        param.weight_quantizer.set_fraction(module.parametrizations.weight.original * param.keep, fraction)


@torch.no_grad()
def refit_(model: nn.Module) -> None:
    """Re-estimate every focused layer's centres, spreads, assignments and exponent range from its current
    latent weights (the paper's periodic re-estimation during fine-tuning)."""
    for _, module, param in focused_layers(model):
        param.weight_quantizer.refit(module.parametrizations.weight.original * param.keep)


@torch.no_grad()
def focused_codes(model: nn.Module) -> dict[str, tuple[torch.Tensor, int]]:
    """Per focused layer: integer codes (-1 where pruned) and header bits, for :func:`compress.compression_table`."""
    out = {}
    for name, module, param in focused_layers(model):
        out[name] = (param.weight_quantizer.codes(module.parametrizations.weight.original * param.keep).cpu(),
                     param.weight_quantizer.header_bits)
    return out
