"""How a comparison is read (GUIDE section 3), for every method's studies: means with confidence intervals
over seeds, pre-specified contrasts as paired differences (same seed, same data split, same test images),
and an exact McNemar test per seed over the test images two arms classify differently.

The seed pairs the arms: it fixes the calibration images, the search subsets and the fine-tuning's data
order, so a paired difference removes what the arms share. Intervals are Student-t over seeds (few seeds:
wide intervals, which is the honest answer); scipy supplies the distributions.
"""

from __future__ import annotations

import base64
import math
from dataclasses import dataclass

import numpy as np
import torch
from scipy import stats


def pack_correct(correct: torch.Tensor | np.ndarray) -> dict[str, object]:
    """Per-image correctness as compact JSON: the count and the bits, packed and base64-encoded."""
    flags = np.asarray(correct, dtype=bool).ravel()
    return {"images": int(flags.size), "bits": base64.b64encode(np.packbits(flags)).decode("ascii")}


def unpack_correct(packed: dict[str, object]) -> np.ndarray:
    """The bool vector :func:`pack_correct` stored."""
    count = int(packed["images"])
    raw = np.frombuffer(base64.b64decode(str(packed["bits"])), dtype=np.uint8)
    if raw.size * 8 < count:
        raise ValueError(f"packed correctness holds {raw.size * 8} bits for {count} images")
    return np.unpackbits(raw, count=count).astype(bool)


@dataclass(frozen=True)
class Interval:
    """A mean and its two-sided confidence interval (``low``/``high`` NaN with fewer than two values)."""

    mean: float
    low: float
    high: float
    n: int

    @property
    def half_width(self) -> float:
        return (self.high - self.low) / 2


def mean_interval(values, level: float = 0.95) -> Interval:
    """Mean and Student-t confidence interval of ``values`` (e.g. one accuracy per seed)."""
    x = np.asarray(values, dtype=np.float64)
    x = x[~np.isnan(x)]
    if x.size == 0:
        return Interval(math.nan, math.nan, math.nan, 0)
    mean = float(x.mean())
    if x.size < 2:
        return Interval(mean, math.nan, math.nan, int(x.size))
    half = float(stats.t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size))
    return Interval(mean, mean - half, mean + half, int(x.size))


def paired_difference(a, b, level: float = 0.95) -> Interval:
    """Mean of ``a[i] - b[i]`` over pairs (seeds) with its Student-t interval."""
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal lengths, got {a.shape} and {b.shape}")
    return mean_interval(a - b, level)


@dataclass(frozen=True)
class McNemar:
    """Images only ``a`` gets right, only ``b`` gets right, and the exact two-sided p-value."""

    only_a: int
    only_b: int
    p_value: float


def mcnemar(correct_a, correct_b) -> McNemar:
    """Exact McNemar test on paired per-image correctness: under "the arms are equally accurate" each
    discordant image is a fair coin, so the count of one kind is Binomial(discordant, 1/2)."""
    a, b = np.asarray(correct_a, dtype=bool), np.asarray(correct_b, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired correctness needs the same images, got {a.size} and {b.size}")
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    discordant = only_a + only_b
    p = 1.0 if discordant == 0 else float(stats.binomtest(only_a, discordant, 0.5).pvalue)
    return McNemar(only_a, only_b, p)
