"""Confidence intervals, paired differences and McNemar on constructed data with known answers."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from cpq_lib.statistics import mcnemar, mean_interval, pack_correct, paired_difference, unpack_correct


def test_mean_interval_is_the_student_t_interval():
    interval = mean_interval([0.80, 0.82, 0.84])
    half = stats.t.ppf(0.975, 2) * 0.02 / math.sqrt(3)  # std of (0.80, 0.82, 0.84) is 0.02
    assert interval.mean == pytest.approx(0.82) and interval.half_width == pytest.approx(half)
    assert (interval.low, interval.high) == pytest.approx((0.82 - half, 0.82 + half))
    one = mean_interval([0.5])
    assert one.mean == 0.5 and math.isnan(one.low) and one.n == 1


def test_paired_difference_removes_what_the_pairs_share():
    # seeds move both arms together by a lot; the arm is always 1 point better: the paired CI is exact
    shared = np.array([0.70, 0.80, 0.90, 0.75])
    interval = paired_difference(shared + 0.01, shared)
    assert interval.mean == pytest.approx(0.01) and interval.half_width == pytest.approx(0.0, abs=1e-12)
    unpaired = mean_interval(shared + 0.01)
    assert unpaired.half_width > 0.1  # read unpaired, the same numbers say nothing
    with pytest.raises(ValueError, match="equal lengths"):
        paired_difference([1, 2], [1])


def test_mcnemar_counts_discordant_images_and_gives_the_exact_binomial_p():
    a = np.array([True] * 10 + [False] * 2 + [True] * 50)
    b = np.array([False] * 10 + [True] * 2 + [True] * 50)
    test = mcnemar(a, b)
    assert (test.only_a, test.only_b) == (10, 2)
    assert test.p_value == pytest.approx(2 * stats.binom.cdf(2, 12, 0.5))  # two-sided exact: 0.0386
    assert mcnemar(a, a).p_value == 1.0
    assert mcnemar(b, a).p_value == pytest.approx(test.p_value)


def test_per_image_correctness_round_trips_compactly():
    flags = np.random.default_rng(1).random(10_001) < 0.7
    packed = pack_correct(flags)
    assert len(packed["bits"]) < 1800  # 10,001 bits -> 1,251 bytes -> base64
    assert np.array_equal(unpack_correct(packed), flags)
    with pytest.raises(ValueError, match="holds 8 bits for 9 images"):
        unpack_correct({"images": 9, "bits": pack_correct(flags[:8])["bits"]})
