"""Focused quantization (Zhao et al., NeurIPS 2019): power-of-two levels centred on a layer's weight modes.

After fine-grained pruning a layer's non-zero weights form two modes (one positive, one negative).
Per layer:

1. A 2-component Gaussian mixture (scikit-learn) is fitted to the non-zero weights, started from the
   positive and the negative weights' means (the fit is then deterministic for a seed).
2. **Separation**: the squared 2-Wasserstein distance between the two components after standardising
   by the mean and standard deviation of all non-zero weights,
   ``((mu_1 - mu_2)^2 + (sigma_1 - sigma_2)^2) / sigma^2``. Above ``separation_threshold`` (2, as the
   paper) the layer is quantized per component ("focused"); otherwise with plain shift levels around 0.
3. **Levels**: a weight of component c is recentred, ``z = (w - mu_c) / sigma_c``, and mapped to
   ``sign(z) * 2^e`` with ``e = round(log2 |z|)`` clamped to ``[e_max - E + 1, e_max]``; the weight
   becomes ``alpha * (sigma_c * sign(z) 2^e + mu_c)`` with a learnable layer scale ``alpha``. Plain shift
   mode is the same with one component ``mu = 0``, ``sigma`` = the standard deviation.
4. **Bits**: a code of ``bits`` bits holds the sign, the exponent and, when focused, the component:
   ``E = 2^(bits - 2)`` exponents when focused, ``2^(bits - 1)`` in plain shift mode (at least 2 bits).
5. **Overflow rule**: ``e_max`` is the smallest exponent for which at most ``1 / (2^bits + 1)`` of the
   recentred magnitudes exceed ``2^e_max`` (those clip to the top level).

Pruned weights stay exactly zero (their position is coded by the sparsity pattern, not by a level).
Integer codes: ``component * 2E + (sign < 0) * E + (e - e_min)``; :func:`decode_levels` inverts them.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

MIN_BITS = 2
MAX_BITS = 8  # 2^6 = 64 exponents already span 2^-63 of a layer's range: more bits add levels that underflow
DEFAULT_SEPARATION = 2.0


@dataclass(frozen=True)
class LayerMixture:
    """A layer's fitted two-component mixture and what follows from it."""

    means: tuple[float, float]      # (positive-side component, negative-side component)
    stds: tuple[float, float]
    weights: tuple[float, float]
    mean: float                     # of all non-zero weights
    std: float

    @property
    def separation(self) -> float:
        """Squared 2-Wasserstein distance between the components, standardised by the overall spread."""
        s = max(self.std, 1e-30)
        return ((self.means[0] - self.means[1]) ** 2 + (self.stds[0] - self.stds[1]) ** 2) / s ** 2


def check_bits(bits: int) -> int:
    if isinstance(bits, bool) or not isinstance(bits, int) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an integer from {MIN_BITS} (sign and exponent) to {MAX_BITS}, got {bits!r}")
    return bits


def fit_mixture(values: np.ndarray | torch.Tensor, seed: int = 0) -> LayerMixture:
    """Fit two Gaussians to a layer's non-zero weights (needs both signs and at least 4 of them)."""
    from sklearn.mixture import GaussianMixture

    data = np.asarray(values.detach().cpu() if isinstance(values, torch.Tensor) else values, dtype=np.float64).ravel()
    data = data[data != 0]
    positive, negative = data[data > 0], data[data < 0]
    if len(data) < 4 or len(positive) < 2 or len(negative) < 2:
        raise ValueError(f"a mixture needs at least 2 positive and 2 negative non-zero weights, got {len(positive)} and {len(negative)}")
    start = np.array([[positive.mean()], [negative.mean()]])
    phi = len(positive) / len(data)
    mixture = GaussianMixture(2, means_init=start, weights_init=[phi, 1 - phi], random_state=seed).fit(data.reshape(-1, 1))
    means = mixture.means_[:, 0]
    stds = np.sqrt(mixture.covariances_.reshape(2))
    order = np.argsort(-means)  # positive-side component first
    return LayerMixture(tuple(float(v) for v in means[order]), tuple(float(v) for v in stds[order]),
                        tuple(float(v) for v in mixture.weights_[order]), float(data.mean()), float(data.std()))


def exponent_count(bits: int, focused: bool) -> int:
    check_bits(bits)
    return 2 ** (bits - 2) if focused else 2 ** (bits - 1)


def overflow_exponent(magnitudes: torch.Tensor, bits: int) -> int:
    """Smallest e_max with at most 1 / (2^bits + 1) of ``magnitudes`` above 2^e_max."""
    allowed = 1.0 / (2 ** check_bits(bits) + 1)
    values = magnitudes[magnitudes > 0].double()
    if values.numel() == 0:
        return 0
    e_max = math.ceil(math.log2(float(values.max())))
    while e_max > -1074 and float((values > 2.0 ** (e_max - 1)).double().mean()) <= allowed:
        e_max -= 1
    return e_max


@dataclass(frozen=True)
class FocusedLayout:
    """Everything needed to map a layer's weights to levels and back (besides the layer scale)."""

    focused: bool
    centres: tuple[float, ...]      # one per component (0.0 in plain shift mode)
    spreads: tuple[float, ...]
    e_min: int
    e_max: int

    @property
    def exponents(self) -> int:
        return self.e_max - self.e_min + 1


def plan_layer(weight: torch.Tensor, bits: int, separation_threshold: float = DEFAULT_SEPARATION, seed: int = 0
               ) -> tuple[FocusedLayout, LayerMixture | None, torch.Tensor]:
    """Decide focused vs plain shift, fit the levels; returns (layout, mixture or None, component per weight)."""
    check_bits(bits)
    w = weight.detach().double()
    nonzero = w != 0
    if not bool(nonzero.any()):
        raise ValueError("layer has no non-zero weights (pruned away entirely)")
    mixture = None
    try:
        mixture = fit_mixture(w[nonzero], seed)
    except ValueError:
        mixture = None  # one-sided layer: plain shift levels
    focused = mixture is not None and mixture.separation > separation_threshold
    if focused:
        centres, spreads = mixture.means, mixture.stds
        component = _assign(w, centres, spreads, mixture.weights)
    else:
        spread = float(w[nonzero].std()) if int(nonzero.sum()) > 1 else float(w[nonzero].abs().max())
        centres, spreads = (0.0,), (max(spread, 1e-30),)
        component = torch.zeros_like(w, dtype=torch.long)
    z = _recentred(w, component, centres, spreads)
    e_max = overflow_exponent(z[nonzero].abs(), bits)
    layout = FocusedLayout(focused, tuple(float(c) for c in centres), tuple(float(s) for s in spreads),
                           e_max - exponent_count(bits, focused) + 1, e_max)
    return layout, mixture, component


def _assign(w: torch.Tensor, centres, spreads, weights) -> torch.Tensor:
    """Most likely component of every weight under the mixture."""
    log_p = torch.stack([math.log(max(pi, 1e-300)) - math.log(s) - 0.5 * ((w - m) / s) ** 2
                         for m, s, pi in zip(centres, spreads, weights)])
    return log_p.argmax(0)


def _recentred(w: torch.Tensor, component: torch.Tensor, centres, spreads) -> torch.Tensor:
    centre = torch.tensor(centres, dtype=w.dtype, device=w.device)[component]
    spread = torch.tensor(spreads, dtype=w.dtype, device=w.device)[component]
    return (w - centre) / spread


def quantize_levels(weight: torch.Tensor, layout: FocusedLayout, component: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes, dequantized weight without the layer scale); pruned weights give code -1 and 0.0."""
    w = weight.detach().double()
    nonzero = w != 0
    z = _recentred(w, component, layout.centres, layout.spreads)
    sign = torch.where(z < 0, -1.0, 1.0).double()
    exponent = torch.round(torch.log2(z.abs().clamp_min(2.0 ** (layout.e_min - 1)))).clamp(layout.e_min, layout.e_max)
    codes = component * 2 * layout.exponents + (sign < 0).long() * layout.exponents + (exponent - layout.e_min).long()
    codes = torch.where(nonzero, codes, torch.full_like(codes, -1))
    return codes, decode_levels(codes, layout).to(weight.dtype)


def decode_levels(codes: torch.Tensor, layout: FocusedLayout) -> torch.Tensor:
    """Weights (without the layer scale) from integer codes; code -1 is a pruned weight (0.0)."""
    n = layout.exponents
    safe = codes.clamp_min(0)
    component = safe // (2 * n)
    sign = torch.where((safe // n) % 2 == 1, -1.0, 1.0).double()
    exponent = (safe % n + layout.e_min).double()
    centre = torch.tensor(layout.centres, dtype=torch.float64, device=codes.device)[component]
    spread = torch.tensor(layout.spreads, dtype=torch.float64, device=codes.device)[component]
    values = spread * sign * torch.exp2(exponent) + centre
    return torch.where(codes >= 0, values, torch.zeros_like(values))


class FocusedWeightQuantizer(nn.Module):
    """Module form: ``forward(weight)`` returns ``alpha * levels`` with a straight-through gradient to the weight.

    ``fraction`` (0..1) is the share of non-zero weights held at their levels (incremental
    quantization quantizes the largest magnitudes first); the rest pass through in full precision.
    """

    def __init__(self, weight: torch.Tensor, bits: int, separation_threshold: float = DEFAULT_SEPARATION, seed: int = 0,
                 fraction: float = 1.0) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        layout, self.mixture, component = plan_layer(weight, bits, separation_threshold, seed)
        # the layout lives in buffers, so a state dict restores it (checkpoints, resume)
        self.register_buffer("centres", torch.tensor(layout.centres, dtype=torch.float64))
        self.register_buffer("spreads", torch.tensor(layout.spreads, dtype=torch.float64))
        self.register_buffer("exponent_range", torch.tensor([layout.e_min, layout.e_max]))
        self.register_buffer("focused", torch.tensor(layout.focused))
        self.register_buffer("component", component)
        self.alpha = nn.Parameter(torch.ones((), dtype=weight.dtype, device=weight.device))
        self.register_buffer("held", torch.zeros_like(weight, dtype=torch.bool))
        self.set_fraction(weight, fraction)

    @property
    def layout(self) -> FocusedLayout:
        e_min, e_max = (int(v) for v in self.exponent_range)
        return FocusedLayout(bool(self.focused), tuple(self.centres.tolist()), tuple(self.spreads.tolist()), e_min, e_max)

    @torch.no_grad()
    def set_fraction(self, weight: torch.Tensor, fraction: float) -> None:
        if not 0.0 <= fraction <= 1.0:
            raise ValueError(f"fraction must be in [0, 1], got {fraction}")
        nonzero = weight != 0
        count = round(fraction * int(nonzero.sum()))
        order = torch.argsort(torch.where(nonzero, weight.abs(), torch.full_like(weight, -1.0)).flatten(), descending=True, stable=True)
        held = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
        held[order[:count]] = True
        self.held.copy_(held.view_as(weight))

    def codes(self, weight: torch.Tensor) -> torch.Tensor:
        return quantize_levels(weight, self.layout, self.component)[0]

    @property
    def header_bits(self) -> int:
        """What a decoder needs besides the codes: centre and spread per component, e_min, e_max, alpha, mode."""
        return 32 * 2 * len(self.layout.centres) + 8 + 8 + 32 + 1

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        _, levels = quantize_levels(weight, self.layout, self.component)
        quantized = weight + (levels - weight).detach()  # straight-through to the latent weight
        return torch.where(self.held, self.alpha * quantized, weight)
