"""Focused quantization (Zhao et al., NeurIPS 2019): power-of-two levels centred on a layer's weight modes.

After fine-grained pruning a layer's non-zero weights form two modes (one positive, one negative).
Per layer:

1. A 2-component Gaussian mixture (scikit-learn) is fitted to the non-zero weights, started from the
   positive and the negative weights' means (the fit is then deterministic for a seed).
2. **Separation**: the squared 2-Wasserstein distance between the two components after standardising
   by the mean and standard deviation of all non-zero weights,
   ``((mu_1 - mu_2)^2 + (sigma_1 - sigma_2)^2) / sigma^2``. Above ``separation_threshold`` (2, as the
   paper) the layer is quantized per component ("focused"); otherwise with plain shift levels around 0.
3. **Assignment**: each weight belongs to the component most likely under the mixture (``argmax``), or
   to one drawn from the mixture's posterior (``sample``, the paper's 3.3; seeded).
4. **Levels**: a weight of component c is recentred, ``z = (w - mu_c) / sigma_c``, mapped to a shift
   level ``q(z)`` and becomes ``alpha * (sigma_c * q(z) + mu_c)`` with a learnable layer scale ``alpha``.
   Plain shift mode is the same with one component ``mu = 0``, ``sigma`` = the standard deviation.
   Two level sets:

   * ``levels="paper"`` (default; paper eq. 1): a (k+2)-bit shift quantizer holds ``s * 2^e`` with
     s in {-1, 0, +1} and E = 2^k exponents, rounding to the **nearest value** (ties to the smaller
     magnitude). An n-bit code spends one bit on the component when focused, so a focused layer has
     ``E = 2^(n-3)`` exponents plus zero, a plain one ``2^(n-2)`` plus zero. At 2 bits no component bit
     fits: every layer is plain (ternary levels).
   * ``levels="log2"``: no zero level, ``E = 2^(n-2)`` exponents when focused and ``2^(n-1)`` plain,
     rounding in the log domain (``e = round(log2 |z|)``). It spends the sign and zero codes on one more
     exponent octave, so its n-bit set has as many exponents as the paper's (n+1)-bit one: compare
     them one bit apart.
5. **Overflow rule**: ``e_max`` is the smallest exponent for which at most ``1 / (2^bits + 1)`` of the
   recentred magnitudes exceed ``2^e_max`` (those clip to the top level).
6. **Hardware variant** (``hardware=True``, the paper's multiplication-free inference): each centre is
   rounded to a signed power of two and the two spreads are tied (their mixture-weighted quadratic
   mean), so ``alpha * sigma`` is one per-layer factor and ``alpha * mu_c`` a shift.
7. **Re-estimation** (:meth:`FocusedWeightQuantizer.refit`): centres, spreads, assignments and the
   exponent range fitted again to the current latent weights (the paper's 3.5), keeping the layer's
   mode (focused or plain) so the state's shapes stay fixed.

Pruned weights stay exactly zero (their position is coded by the sparsity pattern, not by a level).
Integer codes: ``component * P + (sign < 0) * E + (e - e_min)`` for a non-zero level and
``component * P + 2E`` for the zero level, with ``P = 2E (+ 1 with a zero level)`` codes per component;
:func:`decode_levels` inverts them.
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
LEVEL_SETS = ("paper", "log2")
ASSIGNMENTS = ("argmax", "sample")


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


def check_levels(levels: str) -> str:
    if levels not in LEVEL_SETS:
        raise ValueError(f"levels {levels!r} is not allowed; choose one of {list(LEVEL_SETS)}")
    return levels


def exponent_count(bits: int, focused: bool, levels: str = "paper") -> int:
    """Exponents per component that an n-bit code holds (see the module docstring, step 4)."""
    check_bits(bits)
    if check_levels(levels) == "paper":
        if focused and bits < 3:
            raise ValueError(f"a focused {bits}-bit code has no room for a shift quantizer beside the component bit (needs 3 bits)")
        return 2 ** (bits - 3) if focused else 2 ** (bits - 2)
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
    zero_level: bool = True         # the paper's set (s in {-1, 0, 1}, nearest rounding); False: the log2 set

    @property
    def exponents(self) -> int:
        return self.e_max - self.e_min + 1

    @property
    def codes_per_component(self) -> int:
        return 2 * self.exponents + (1 if self.zero_level else 0)


def plan_layer(weight: torch.Tensor, bits: int, separation_threshold: float = DEFAULT_SEPARATION, seed: int = 0,
               levels: str = "paper", assignment: str = "argmax", hardware: bool = False, focused: bool | None = None
               ) -> tuple[FocusedLayout, LayerMixture | None, torch.Tensor]:
    """Decide focused vs plain shift, fit the levels; returns (layout, mixture or None, component per weight).

    ``focused`` forces the mode (re-estimation keeps the first decision); None decides by the separation.
    """
    check_bits(bits)
    check_levels(levels)
    if assignment not in ASSIGNMENTS:
        raise ValueError(f"assignment {assignment!r} is not allowed; choose one of {list(ASSIGNMENTS)}")
    w = weight.detach().double()
    nonzero = w != 0
    if not bool(nonzero.any()):
        raise ValueError("layer has no non-zero weights (pruned away entirely)")
    mixture = None
    try:
        mixture = fit_mixture(w[nonzero], seed)
    except ValueError:
        mixture = None  # one-sided layer: plain shift levels
    room = levels != "paper" or bits >= 3  # a focused code needs its component bit
    if focused is None:
        focused = mixture is not None and mixture.separation > separation_threshold and room
    elif focused and mixture is None:
        raise ValueError("the layer's weights no longer have two signs: a focused layout cannot be re-estimated")
    if focused:
        centres, spreads = mixture.means, mixture.stds
        if hardware:  # signed powers of two and one spread: multiplication-free inference
            centres = tuple(math.copysign(2.0 ** round(math.log2(abs(m))), m) for m in centres)
            tied = math.sqrt(sum(pi * s ** 2 for pi, s in zip(mixture.weights, spreads)))
            spreads = (tied, tied)
        component = _assign(w, centres, spreads, mixture.weights, assignment, seed)
    else:
        spread = float(w[nonzero].std()) if int(nonzero.sum()) > 1 else float(w[nonzero].abs().max())
        centres, spreads = (0.0,), (max(spread, 1e-30),)
        component = torch.zeros_like(w, dtype=torch.long)
    z = _recentred(w, component, centres, spreads)
    e_max = overflow_exponent(z[nonzero].abs(), bits)
    layout = FocusedLayout(focused, tuple(float(c) for c in centres), tuple(float(s) for s in spreads),
                           e_max - exponent_count(bits, focused, levels) + 1, e_max, levels == "paper")
    return layout, mixture, component


def _assign(w: torch.Tensor, centres, spreads, weights, assignment: str = "argmax", seed: int = 0) -> torch.Tensor:
    """Component of every weight: the most likely under the mixture, or one drawn from its posterior (seeded)."""
    log_p = torch.stack([math.log(max(pi, 1e-300)) - math.log(s) - 0.5 * ((w - m) / s) ** 2
                         for m, s, pi in zip(centres, spreads, weights)])
    if assignment == "argmax":
        return log_p.argmax(0)
    posterior_first = torch.softmax(log_p, 0)[0]
    generator = torch.Generator(device=w.device).manual_seed(seed)
    draw = torch.rand(w.shape, generator=generator, dtype=w.dtype, device=w.device)
    return (draw >= posterior_first).long()


def _recentred(w: torch.Tensor, component: torch.Tensor, centres, spreads) -> torch.Tensor:
    centre = torch.tensor(centres, dtype=w.dtype, device=w.device)[component]
    spread = torch.tensor(spreads, dtype=w.dtype, device=w.device)[component]
    return (w - centre) / spread


def _nearest_shift_level(magnitude: torch.Tensor, e_min: int, e_max: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(exponent, is zero) of the level in {0} U {2^e : e_min <= e <= e_max} nearest to ``magnitude``
    (ties to the smaller magnitude)."""
    floor = torch.floor(torch.log2(magnitude.clamp_min(2.0 ** (e_min - 2))))
    low = floor.clamp(e_min, e_max)
    high = (floor + 1).clamp(e_min, e_max)
    distances = torch.stack([magnitude, (magnitude - torch.exp2(low)).abs(), (magnitude - torch.exp2(high)).abs()])
    choice = distances.argmin(0)  # the first of equal distances: the smaller magnitude
    return torch.where(choice == 2, high, low), choice == 0


def quantize_levels(weight: torch.Tensor, layout: FocusedLayout, component: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(integer codes, dequantized weight without the layer scale); pruned weights give code -1 and 0.0."""
    w = weight.detach().double()
    nonzero = w != 0
    z = _recentred(w, component, layout.centres, layout.spreads)
    sign = torch.where(z < 0, -1.0, 1.0).double()
    n = layout.exponents
    if layout.zero_level:
        exponent, zero = _nearest_shift_level(z.abs(), layout.e_min, layout.e_max)
    else:
        exponent = torch.round(torch.log2(z.abs().clamp_min(2.0 ** (layout.e_min - 1)))).clamp(layout.e_min, layout.e_max)
        zero = torch.zeros_like(nonzero)
    offset = torch.where(zero, torch.full_like(component, 2 * n), (sign < 0).long() * n + (exponent - layout.e_min).long())
    codes = component * layout.codes_per_component + offset
    codes = torch.where(nonzero, codes, torch.full_like(codes, -1))
    return codes, decode_levels(codes, layout).to(weight.dtype)


def split_codes(codes: torch.Tensor, layout: FocusedLayout) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(component, negative, exponent offset e - e_min, is zero level) of codes (pruned codes -1 read as code 0)."""
    n = layout.exponents
    safe = codes.clamp_min(0)
    component, offset = safe // layout.codes_per_component, safe % layout.codes_per_component
    zero = offset == 2 * n
    return component, (offset // n == 1) & ~zero, torch.where(zero, torch.zeros_like(offset), offset % n), zero


def decode_levels(codes: torch.Tensor, layout: FocusedLayout) -> torch.Tensor:
    """Weights (without the layer scale) from integer codes; code -1 is a pruned weight (0.0)."""
    component, negative, shift, zero = split_codes(codes, layout)
    sign = torch.where(negative, -1.0, 1.0).double()
    magnitude = torch.where(zero, torch.zeros_like(sign), torch.exp2((shift + layout.e_min).double()))
    centre = torch.tensor(layout.centres, dtype=torch.float64, device=codes.device)[component]
    spread = torch.tensor(layout.spreads, dtype=torch.float64, device=codes.device)[component]
    values = spread * sign * magnitude + centre
    return torch.where(codes >= 0, values, torch.zeros_like(values))


class FocusedWeightQuantizer(nn.Module):
    """Module form: ``forward(weight)`` returns ``alpha * levels`` with a straight-through gradient to the weight.

    ``fraction`` (0..1) is the share of non-zero weights held at their levels (incremental
    quantization quantizes the largest magnitudes first); the rest pass through in full precision.
    """

    def __init__(self, weight: torch.Tensor, bits: int, separation_threshold: float = DEFAULT_SEPARATION, seed: int = 0,
                 fraction: float = 1.0, levels: str = "paper", assignment: str = "argmax", hardware: bool = False) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.levels, self.assignment, self.hardware, self.seed = check_levels(levels), assignment, hardware, seed
        self.separation_threshold = separation_threshold
        layout, self.mixture, component = plan_layer(weight, bits, separation_threshold, seed, levels, assignment, hardware)
        # the layout lives in buffers, so a state dict restores it (checkpoints, resume)
        self.register_buffer("centres", torch.tensor(layout.centres, dtype=torch.float64))
        self.register_buffer("spreads", torch.tensor(layout.spreads, dtype=torch.float64))
        self.register_buffer("exponent_range", torch.tensor([layout.e_min, layout.e_max]))
        self.register_buffer("focused", torch.tensor(layout.focused))
        self.register_buffer("zero_level", torch.tensor(layout.zero_level))
        self.register_buffer("component", component)
        self.register_buffer("refits", torch.tensor(0))
        self.alpha = nn.Parameter(torch.ones((), dtype=weight.dtype, device=weight.device))
        self.register_buffer("held", torch.zeros_like(weight, dtype=torch.bool))
        self.set_fraction(weight, fraction)

    @property
    def layout(self) -> FocusedLayout:
        e_min, e_max = (int(v) for v in self.exponent_range)
        return FocusedLayout(bool(self.focused), tuple(self.centres.tolist()), tuple(self.spreads.tolist()), e_min, e_max,
                             bool(self.zero_level))

    @torch.no_grad()
    def refit(self, weight: torch.Tensor) -> None:
        """Re-estimate centres, spreads, assignments and exponent range from ``weight`` (the current latent
        weights, pruned ones zero), keeping the mode; each refit draws sampled assignments with a new seed."""
        self.refits += 1
        layout, self.mixture, component = plan_layer(weight, self.bits, self.separation_threshold,
                                                     self.seed + 7919 * int(self.refits), self.levels, self.assignment,
                                                     self.hardware, focused=bool(self.focused))
        self.centres.copy_(torch.tensor(layout.centres, dtype=torch.float64))
        self.spreads.copy_(torch.tensor(layout.spreads, dtype=torch.float64))
        self.exponent_range.copy_(torch.tensor([layout.e_min, layout.e_max]))
        self.component.copy_(component)

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
