"""Deep Compression weight sharing: centroids, codes, zeros kept, better than uniform levels at equal bits."""

from __future__ import annotations

import pytest
import torch

from cpq_lib.sparse.kmeans import decode_codebook, fit_codebook, quantize_with_codebook


def _sparse_weight(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(32, 16, 3, 3, generator=g) * 0.1
    w[w.abs() < 0.08] = 0.0
    return w


@pytest.mark.parametrize("bits", [2, 3, 5])
def test_codes_round_trip_and_zeros_stay(bits):
    weight = _sparse_weight()
    codebook = fit_codebook(weight, bits)
    codes, shared = quantize_with_codebook(weight, codebook)
    assert len(codebook.centroids) == 2 ** bits and codebook.bits == 32 * 2 ** bits
    assert torch.equal(decode_codebook(codes, codebook), shared)
    assert bool((shared[weight == 0] == 0).all()) and bool((codes[weight == 0] == -1).all())
    assert int(codes.max()) < 2 ** bits and set(shared[weight != 0].unique().tolist()) <= set(codebook.centroids.tolist())


def test_kmeans_beats_uniform_levels_at_equal_bits():
    weight = _sparse_weight()
    nonzero = weight != 0
    codebook = fit_codebook(weight, 3)
    _, shared = quantize_with_codebook(weight, codebook)
    levels = torch.linspace(float(weight[nonzero].min()), float(weight[nonzero].max()), 8)
    uniform = levels[(weight.unsqueeze(-1) - levels).abs().argmin(-1)]
    assert float(((shared - weight)[nonzero] ** 2).sum()) < float(((uniform - weight)[nonzero] ** 2).sum())


def test_few_distinct_weights_and_bad_inputs():
    weight = torch.tensor([0.0, 0.5, -0.5, 0.5, 0.0])
    codebook = fit_codebook(weight, 4)
    assert sorted(codebook.centroids.tolist()) == [-0.5, 0.5]
    with pytest.raises(ValueError, match="bits must be an integer in 1..16"):
        fit_codebook(weight, 0)
    with pytest.raises(ValueError, match="no non-zero weights"):
        fit_codebook(torch.zeros(3), 2)
