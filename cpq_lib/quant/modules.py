"""Quantized twins of Conv2d and Linear: an input (activation) quantizer, a weight quantizer, a weight cache.

They subclass the float modules, so ``weight``/``bias`` keep their names and code that looks for
Conv2d/Linear still finds them. In eval mode the fake-quantized weight is computed once and reused
until the weight, its scales or its bit-widths change (tracked by tensor version counters), so
quantized inference costs about what float inference costs.
"""

from __future__ import annotations

import copy
import functools
import math

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import ActivationQuantizer, WeightQuantizer


class QuantizedLayer:
    """Mixin: weight quantization, caching and operator metrics shared by QConv2d and QLinear."""

    weight: nn.Parameter
    weight_quantizer: WeightQuantizer
    input_quantizer: ActivationQuantizer | None

    def _init_quant(self, weight_quantizer: WeightQuantizer, input_quantizer: ActivationQuantizer | None) -> None:
        self.weight_quantizer = weight_quantizer
        self.input_quantizer = input_quantizer
        self._cache: tuple[tuple, torch.Tensor] | None = None

    def _cache_key(self) -> tuple:
        q = self.weight_quantizer
        tensors = [self.weight, q.scale, q.bits, q.row_groups, q.col_groups]
        if q.zero_point is not None:
            tensors.append(q.zero_point)
        return tuple((t.data_ptr(), t._version, tuple(t.shape), t.stride()) for t in tensors)

    def quantized_weight(self) -> torch.Tensor:
        """The fake-quantized weight; cached when no gradient is needed."""
        if torch.compiler.is_compiling():  # a compiled graph recomputes it: a few small fused operations
            return self.weight_quantizer(self.weight)
        if self.training or torch.is_grad_enabled() and self.weight.requires_grad:
            self._cache = None
            return self.weight_quantizer(self.weight)
        key = self._cache_key()
        if self._cache is None or self._cache[0] != key:
            with torch.no_grad():
                self._cache = (key, self.weight_quantizer(self.weight))
        return self._cache[1]

    def quantize_input(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.input_quantizer is None else self.input_quantizer(x)

    # --- operator metrics -------------------------------------------------------------------------
    def weight_bits(self) -> torch.Tensor:
        return self.weight_quantizer.bits.detach().cpu()

    def activation_bits(self) -> int | None:
        if self.input_quantizer is None or not self.input_quantizer.enabled:
            return None
        return int(self.input_quantizer.bits)

    def params_per_channel(self) -> int:
        return math.prod(self.weight.shape[1:])


class QConv2d(QuantizedLayer, nn.Conv2d):
    @classmethod
    def from_float(cls, conv: nn.Conv2d, weight_quantizer: WeightQuantizer,
                   input_quantizer: ActivationQuantizer | None) -> "QConv2d":
        """Wrap ``conv``'s own weight and bias tensors (shared, not copied)."""
        new = cls(conv.in_channels, conv.out_channels, conv.kernel_size, stride=conv.stride, padding=conv.padding,
                  dilation=conv.dilation, groups=conv.groups, bias=conv.bias is not None,
                  padding_mode=conv.padding_mode, device="meta")
        new.weight, new.bias = conv.weight, conv.bias
        new.train(conv.training)
        new._init_quant(weight_quantizer, input_quantizer)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(self.quantize_input(x), self.quantized_weight(), self.bias)


class QLinear(QuantizedLayer, nn.Linear):
    @classmethod
    def from_float(cls, linear: nn.Linear, weight_quantizer: WeightQuantizer,
                   input_quantizer: ActivationQuantizer | None) -> "QLinear":
        """Wrap ``linear``'s own weight and bias tensors (shared, not copied)."""
        new = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        new.weight, new.bias = linear.weight, linear.bias
        new.train(linear.training)
        new._init_quant(weight_quantizer, input_quantizer)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.quantize_input(x), self.quantized_weight(), self.bias)


class QuantizedSubclass(QuantizedLayer):
    """Twin of a Conv2d / Linear *subclass* (timm's ``StdConv2d``, ``Conv2dSame``, ...): the subclass's own
    ``forward`` runs, with the fake-quantized input and the fake-quantized weight in place of ``weight``.

    Replacing such a layer by a plain QConv2d would drop what its forward adds (weight standardisation,
    "same" padding); keeping the instance and swapping the weight it reads keeps it, whatever it is.
    """

    _float_class: type[nn.Module]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        weight = self.quantized_weight()
        raw = self._parameters["weight"]
        self._parameters["weight"] = weight  # what the subclass's forward reads as self.weight, for this call
        try:
            return self._float_class.forward(self, self.quantize_input(x), *args, **kwargs)
        finally:
            self._parameters["weight"] = raw

    def to_float(self) -> nn.Module:
        """The original subclass with the fake-quantized weight baked in (undo)."""
        plain = _shallow_module_copy(self, self._float_class)
        plain._parameters["weight"] = nn.Parameter(self.weight_quantizer(self.weight.detach()).clone(),
                                                   requires_grad=self.weight.requires_grad)
        for name in ("weight_quantizer", "input_quantizer", "_cache"):
            plain._modules.pop(name, None)
            plain.__dict__.pop(name, None)
        return plain


@functools.cache
def _subclass_twin(float_class: type[nn.Module]) -> type[nn.Module]:
    return type(f"Quantized{float_class.__name__}", (QuantizedSubclass, float_class), {"_float_class": float_class})


def _shallow_module_copy(module: nn.Module, cls: type[nn.Module]) -> nn.Module:
    """A new module of class ``cls`` with ``module``'s attributes; its own parameter, buffer, child and hook
    dictionaries (so the copy can change them without changing ``module``), the same tensors."""
    new = cls.__new__(cls)
    new.__dict__.update({k: copy.copy(v) if isinstance(v, (dict, set)) else v for k, v in module.__dict__.items()})
    return new


def quantized_twin(module: nn.Module, weight_quantizer: WeightQuantizer,
                   input_quantizer: ActivationQuantizer | None) -> nn.Module:
    """The quantized stand-in of a Conv2d / Linear: QConv2d / QLinear for the plain classes, a
    :class:`QuantizedSubclass` twin (the subclass's own forward) for anything derived from them."""
    if type(module) is nn.Conv2d:
        return QConv2d.from_float(module, weight_quantizer, input_quantizer)
    if type(module) is nn.Linear:
        return QLinear.from_float(module, weight_quantizer, input_quantizer)
    twin = _shallow_module_copy(module, _subclass_twin(type(module)))
    twin._init_quant(weight_quantizer, input_quantizer)
    return twin
