"""The quantized channels of a model as one flat vector, so allocators work on a bit-width per channel.

Averages are parameter-weighted: a channel weighs as many parameters as its filter holds, so the
average is the average weight bit-width over every quantized weight (the thesis's measure).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from torch import nn

from ..errors import CpqError
from ..quant import BitPlan, LayerBits, quantized_layers


class AllocationError(CpqError):
    """Bad allocation settings: unknown allocator, unreachable target, missing scores."""


@dataclass(frozen=True)
class Target:
    """A budget: average weight bits at most ``weight_bits + slack``, activations at ``act_bits``.

    The thesis's points are written W <= 2.06 / A2, W <= 3.06 / A3, W <= 4.06 / A4: ``Target(2, 2)``
    with the default slack of 0.06.
    """

    weight_bits: float
    act_bits: int | None
    slack: float = 0.06
    max_gbitops: float | None = None  # and at most this many BitOPs per sample, in 1e9
    max_bytes: float | None = None    # and at most this many stored bytes (cpq_lib.quant.metrics.model_size_bits / 8)

    def __post_init__(self) -> None:
        for name in ("max_gbitops", "max_bytes"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise AllocationError(f"{name} must be a positive number or None, got {value!r}")
        if isinstance(self.weight_bits, bool) or not isinstance(self.weight_bits, (int, float)) or not 0 < self.weight_bits <= 16:
            raise AllocationError(f"target weight bits must be a number in (0, 16], got {self.weight_bits!r}")
        if self.act_bits is not None and (isinstance(self.act_bits, bool) or not isinstance(self.act_bits, int) or not 1 <= self.act_bits <= 16):
            raise AllocationError(f"target activation bits must be an integer 1..16 or None, got {self.act_bits!r}")
        if not 0 <= self.slack < 1:
            raise AllocationError(f"slack must be in [0, 1), got {self.slack!r}")

    @property
    def max_bits(self) -> float:
        return self.weight_bits + self.slack

    def label(self) -> str:
        act = "fp" if self.act_bits is None else str(self.act_bits)
        return f"W{self.weight_bits:g}A{act}"

    def start_bits(self) -> int:
        """The thesis's starting bit-width N: 4, or 6 for targets of 3 bits and more."""
        return 6 if self.weight_bits >= 3 else 4


@dataclass
class ChannelSpace:
    """Every output channel of every quantized layer, in layer order."""

    names: list[str]
    channels: list[int]
    params_per_channel: list[int]
    offsets: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = [0]
        for count in self.channels:
            self.offsets.append(self.offsets[-1] + count)

    @classmethod
    def of(cls, model: nn.Module) -> "ChannelSpace":
        layers = quantized_layers(model)
        if not layers:
            raise AllocationError("the model has no quantized layers; apply cpq_lib.quant.quantize_ first")
        return cls([n for n, _ in layers], [int(l.weight.shape[0]) for _, l in layers],
                   [math.prod(l.weight.shape[1:]) for _, l in layers])

    @property
    def size(self) -> int:
        return self.offsets[-1]

    def weights(self) -> torch.Tensor:
        """Parameters per channel, as a float64 vector over all channels."""
        return torch.cat([torch.full((c,), float(p), dtype=torch.float64) for c, p in zip(self.channels, self.params_per_channel)])

    def layer_of_channel(self) -> torch.Tensor:
        return torch.cat([torch.full((c,), i, dtype=torch.long) for i, c in enumerate(self.channels)])

    def average(self, bits: torch.Tensor) -> float:
        weights = self.weights()
        return float((bits.double() * weights).sum() / weights.sum())

    def layer_slice(self, name: str) -> slice:
        index = self.names.index(name)
        return slice(self.offsets[index], self.offsets[index + 1])

    def split(self, bits: torch.Tensor) -> dict[str, torch.Tensor]:
        return {name: bits[self.offsets[i]:self.offsets[i + 1]] for i, name in enumerate(self.names)}

    def flatten(self, per_layer: dict[str, torch.Tensor]) -> torch.Tensor:
        missing = [n for n in self.names if n not in per_layer]
        if missing:
            raise AllocationError(f"no values for quantized layer(s) {missing[:5]}")
        return torch.cat([torch.as_tensor(per_layer[n]).flatten() for n in self.names])

    def to_plan(self, bits: torch.Tensor, act_bits: int | None, **meta) -> BitPlan:
        layers = {name: LayerBits(values.long().tolist(), act_bits) for name, values in self.split(bits).items()}
        return BitPlan(layers, meta)

    def from_plan(self, plan: BitPlan) -> torch.Tensor:
        return self.flatten({name: torch.tensor(layer.weight) for name, layer in plan.layers.items()})

    def uniform(self, bits: int) -> torch.Tensor:
        return torch.full((self.size,), int(bits), dtype=torch.long)


def candidate_widths(allocator: str, target: Target, min_bits: int, start_bits: int | None) -> list[int]:
    """The widths ``min_bits..start`` a per-layer or per-channel solver chooses from (``start``: the
    target's starting width unless given), refused unless they lie in 1..16, lowest first."""
    start = start_bits or target.start_bits()
    if not 1 <= min_bits <= start <= 16:
        raise AllocationError(f"{allocator} widths {min_bits}..{start} must lie in 1..16, lowest first")
    return list(range(min_bits, start + 1))
