"""Lossless coding: exact round trips (also over random streams), sizes against the empirical entropy."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cpq_lib.sparse import CODERS, decode, empirical_entropy_bits, encode, positions_from_gaps, relative_indices
from cpq_lib.sparse.coding import canonical_codes, huffman_lengths

streams = st.lists(st.integers(min_value=-(2**31), max_value=2**31 - 1), max_size=300) | st.lists(
    st.integers(min_value=-4, max_value=4), max_size=2000)


@pytest.mark.parametrize("coder", CODERS)
@settings(max_examples=60, deadline=None)
@given(values=streams)
def test_round_trip_is_exact(coder, values):
    stream = encode(values, coder)
    decoded = decode(stream)
    assert decoded.dtype == np.int64 and decoded.tolist() == list(values)


def _skewed(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.choice(np.arange(-7, 8), size=n, p=np.exp(-np.abs(np.arange(-7, 8)) / 1.3) / np.exp(-np.abs(np.arange(-7, 8)) / 1.3).sum())


def test_ans_is_within_one_percent_of_the_entropy_and_huffman_above_it():
    symbols = _skewed(100_000)
    entropy = empirical_entropy_bits(symbols)
    ans, huffman = encode(symbols, "ans"), encode(symbols, "huffman")
    assert entropy <= ans.payload_bits <= 1.01 * entropy
    assert ans.bits <= 1.02 * entropy  # model parameters included
    assert huffman.payload_bits >= entropy and huffman.payload_bits <= entropy + len(symbols)  # < 1 bit per symbol over
    span_bits = 2 * 32 + 15  # symbols -7..7: bounds and a presence bit each
    assert huffman.table_bits == span_bits + 15 * 6
    assert ans.table_bits == span_bits + 6 + 15 * int(np.unique(symbols, return_counts=True)[1].max()).bit_length()


def test_alphabet_table_picks_the_shorter_form():
    from cpq_lib.sparse.coding import alphabet_bits

    assert alphabet_bits(np.array([-1, 0, 3])) == 64 + 5
    assert alphabet_bits(np.array([0, 10**6])) == 32 * 3  # a sparse alphabet is listed


def test_entropy_of_a_known_stream():
    assert empirical_entropy_bits([0, 0, 1, 1]) == pytest.approx(4.0)
    assert empirical_entropy_bits([5] * 10) == 0.0 and empirical_entropy_bits([]) == 0.0


def test_canonical_huffman_is_prefix_free_and_optimal_on_a_textbook_case():
    counts = np.array([45, 13, 12, 16, 9, 5])  # CLRS: lengths 1, 3, 3, 3, 4, 4
    lengths = huffman_lengths(counts)
    assert lengths.tolist() == [1, 3, 3, 3, 4, 4]
    codes = canonical_codes(lengths)
    words = [format(int(c), f"0{int(n)}b") for c, n in zip(codes, lengths)]
    assert all(not b.startswith(a) for a in words for b in words if a is not b)
    assert words[0] == "0"


def test_relative_indices_with_fillers_round_trip():
    mask = np.zeros(1000, dtype=bool)
    mask[[0, 3, 4, 600, 999]] = True
    gaps, kept = relative_indices(mask, max_gap=15)
    assert gaps.max() <= 15 and kept.sum() == 5 and (~kept).sum() > 0
    positions = positions_from_gaps(gaps)
    assert positions[kept].tolist() == [0, 3, 4, 600, 999]
    assert not mask[positions[~kept]].any()  # fillers sit on pruned positions


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="coder 'lzma' is not allowed"):
        encode([1, 2], "lzma")
    with pytest.raises(ValueError, match="symbols must be integers"):
        encode([0.5, 1.0])
    with pytest.raises(ValueError, match="32-bit"):
        encode([2**40])
    with pytest.raises(ValueError, match="max_gap must be >= 1"):
        relative_indices([True], max_gap=0)
