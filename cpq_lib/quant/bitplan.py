"""BitPlan: the one object every bit-allocation method returns and everything downstream takes.

Per quantized layer (by module name): a per-output-channel weight bit-width vector (0 = pruned) and
the activation bit-width of the layer's input (None = full precision). Round-trips through JSON.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CpqError
from ..fileio import atomic_write_text
from .primitives import MAX_BITS
from .transform import quantized_layers

FORMAT = "cpq-bitplan/1"


class BitPlanError(CpqError):
    """A BitPlan does not fit a model or holds invalid bit-widths."""


def _check_bit_list(values: Any, where: str) -> list[int]:
    if isinstance(values, torch.Tensor):
        values = values.tolist()
    if not isinstance(values, (list, tuple)):
        raise BitPlanError(f"{where}: expected a list of per-channel bit-widths, got {type(values).__name__}")
    checked = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or (isinstance(value, float) and not value.is_integer()):
            raise BitPlanError(f"{where}[{index}]: bit-widths must be integers, got {value!r}")
        if not 0 <= value <= MAX_BITS:
            raise BitPlanError(f"{where}[{index}]: bit-width {value!r} is outside 0..{MAX_BITS}")
        checked.append(int(value))
    return checked


@dataclass
class LayerBits:
    weight: list[int]
    activation: int | None = None

    def __post_init__(self) -> None:
        self.weight = _check_bit_list(self.weight, "weight")
        if self.activation is not None:
            self.activation = _check_bit_list([self.activation], "activation")[0]
            if self.activation < 1:  # a channel can be pruned (0 bits), an input cannot
                raise BitPlanError(f"activation: bit-width {self.activation} is not allowed; activations take 1..{MAX_BITS} "
                                   f"bits, or null for full precision")


@dataclass
class BitPlan:
    layers: dict[str, LayerBits]
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.meta, dict):
            raise BitPlanError(f"BitPlan meta must be a mapping, got {type(self.meta).__name__}")

    # --- construction -----------------------------------------------------------------------------
    @classmethod
    def from_model(cls, model: nn.Module, **meta: Any) -> "BitPlan":
        """The plan a quantized model currently holds."""
        return cls({name: LayerBits(layer.weight_bits().tolist(), layer.activation_bits())
                    for name, layer in quantized_layers(model)}, dict(meta))

    @classmethod
    def uniform(cls, model: nn.Module, weight_bits: int, act_bits: int | None, **meta: Any) -> "BitPlan":
        plan = cls({name: LayerBits([weight_bits] * layer.weight.shape[0], act_bits)
                    for name, layer in quantized_layers(model)}, {"allocator": "uniform", **meta})
        return plan

    # --- validation and application ---------------------------------------------------------------
    def validate(self, model: nn.Module) -> None:
        """Raise BitPlanError on unknown layers, wrong vector lengths or layers the plan misses."""
        layers = dict(quantized_layers(model))
        unknown = sorted(set(self.layers) - set(layers))
        if unknown:
            raise BitPlanError(f"unknown layer(s) {unknown[:5]}; quantized layers of this model: {sorted(layers)[:8]}...")
        missing = sorted(set(layers) - set(self.layers))
        if missing:
            raise BitPlanError(f"plan has no entry for quantized layer(s) {missing[:5]}")
        for name, bits in self.layers.items():
            channels = layers[name].weight.shape[0]
            if len(bits.weight) != channels:
                raise BitPlanError(f"layer {name!r}: {len(bits.weight)} weight bit-widths for {channels} output channels")
            if bits.activation is not None and layers[name].input_quantizer is None:
                raise BitPlanError(f"layer {name!r} has no activation quantizer, but the plan gives {bits.activation} bits")

    def apply_(self, model: nn.Module, reinitialize_scales: bool = True) -> nn.Module:
        """Set every quantized layer's bit-widths (and, by default, fresh weight scales for them)."""
        self.validate(model)
        layers = dict(quantized_layers(model))
        for name, bits in self.layers.items():
            layer = layers[name]
            device = layer.weight_quantizer.bits.device
            layer.weight_quantizer.set_bits(torch.tensor(bits.weight, device=device),
                                            layer.weight if reinitialize_scales else None)
            if layer.input_quantizer is not None:
                layer.input_quantizer.set_bits(bits.activation)
        return model

    # --- summaries --------------------------------------------------------------------------------
    def average_weight_bits(self, model: nn.Module) -> float:
        """Parameter-weighted average over the plan's layers."""
        layers = dict(quantized_layers(model))
        total = sum(sum(b.weight) * math.prod(layers[n].weight.shape[1:]) for n, b in self.layers.items())
        count = sum(layers[n].weight.numel() for n in self.layers)
        return total / max(1, count)

    # --- JSON -------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "meta": self.meta,
                "layers": {n: {"weight": b.weight, "activation": b.activation} for n, b in self.layers.items()}}

    @classmethod
    def from_dict(cls, data: Any) -> "BitPlan":
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            found = data.get("format") if isinstance(data, dict) else type(data).__name__
            raise BitPlanError(f"not a BitPlan: format {found!r}, expected {FORMAT!r}")
        layers = data.get("layers")
        if not isinstance(layers, dict):
            raise BitPlanError("BitPlan 'layers' must be a mapping of layer name -> {weight, activation}")
        parsed = {}
        for name, entry in layers.items():
            if not isinstance(entry, dict) or "weight" not in entry:
                raise BitPlanError(f"layer {name!r}: expected {{'weight': [...], 'activation': int|null}}, got {entry!r}")
            extra = set(entry) - {"weight", "activation"}
            if extra:
                raise BitPlanError(f"layer {name!r}: unknown field(s) {sorted(extra)}; allowed: weight, activation")
            parsed[name] = LayerBits(_check_bit_list(entry["weight"], f"{name}.weight"),
                                     None if entry.get("activation") is None else _check_bit_list([entry["activation"]], f"{name}.activation")[0])
        meta = data.get("meta", {})
        if not isinstance(meta, dict):
            raise BitPlanError(f"BitPlan 'meta' must be a mapping of names to values, got {type(meta).__name__} {meta!r:.80}")
        return cls(parsed, dict(meta))

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str) -> "BitPlan":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise BitPlanError(f"BitPlan JSON is malformed: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        atomic_write_text(json.dumps(self.to_dict()) + "\n", path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "BitPlan":
        path = Path(path)
        if not path.is_file():
            raise BitPlanError(f"BitPlan file {path} does not exist" + (" (it is a folder)" if path.is_dir() else ""))
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as exc:
            raise BitPlanError(f"BitPlan file {path} is not UTF-8 text ({exc.reason} at byte {exc.start}); "
                               f"a plan is the JSON that BitPlan.save writes") from None
        return cls.from_json(text)
