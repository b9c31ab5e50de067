"""Deep Compression's weight sharing (Han et al. 2016): k-means on a layer's non-zero weights.

``2^bits`` centroids, linearly initialised between the smallest and largest non-zero weight (the
paper's best initialisation), fitted by scikit-learn's KMeans (one run: the initialisation is fixed).
Codes are centroid indices; pruned weights keep code -1 and stay exactly zero. The codebook
(``2^bits`` fp32 values) is part of the coded size.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class Codebook:
    centroids: np.ndarray  # float32, one per code

    @property
    def bits(self) -> int:
        return 32 * len(self.centroids)


def fit_codebook(weight: torch.Tensor, bits: int, seed: int = 0) -> Codebook:
    """k-means centroids of the non-zero weights (at most as many as distinct weights)."""
    from sklearn.cluster import KMeans

    if isinstance(bits, bool) or not isinstance(bits, int) or not 1 <= bits <= 16:
        raise ValueError(f"bits must be an integer in 1..16, got {bits!r}")
    values = weight.detach().double().cpu().numpy().ravel()
    values = values[values != 0]
    if values.size == 0:
        raise ValueError("layer has no non-zero weights (pruned away entirely)")
    clusters = min(2 ** bits, len(np.unique(values)))
    init = np.linspace(values.min(), values.max(), clusters).reshape(-1, 1)
    kmeans = KMeans(clusters, init=init, n_init=1, random_state=seed).fit(values.reshape(-1, 1))
    return Codebook(np.sort(kmeans.cluster_centers_.ravel()).astype(np.float32))


def quantize_with_codebook(weight: torch.Tensor, codebook: Codebook) -> tuple[torch.Tensor, torch.Tensor]:
    """(codes, shared weights): nearest centroid per non-zero weight; pruned weights give -1 and 0."""
    centroids = torch.from_numpy(codebook.centroids).to(weight.device)
    w = weight.detach()
    index = (w.float().unsqueeze(-1) - centroids).abs().argmin(-1)
    codes = torch.where(w != 0, index, torch.full_like(index, -1))
    return codes, decode_codebook(codes, codebook).to(weight.dtype)


def decode_codebook(codes: torch.Tensor, codebook: Codebook) -> torch.Tensor:
    centroids = torch.from_numpy(codebook.centroids).to(codes.device)
    return torch.where(codes >= 0, centroids[codes.clamp_min(0)], torch.zeros((), dtype=centroids.dtype, device=codes.device))


class SharedWeight(torch.nn.Module):
    """Parametrization for Deep Compression's fine-tuning: ``weight = centroids[codes]`` (zero where pruned).

    The centroids are the trainable parameters: each one's gradient is the sum of its weights'
    gradients, which is the paper's centroid update. The latent weight is unused after sharing.
    """

    def __init__(self, codes: torch.Tensor, codebook: Codebook) -> None:
        super().__init__()
        self.register_buffer("codes", codes)
        self.centroids = torch.nn.Parameter(torch.from_numpy(codebook.centroids.copy()).to(codes.device))
        self.codebook_bits = 32  # bits per stored centroid (see :meth:`to_fp16_codebook_`)

    @torch.no_grad()
    def to_fp16_codebook_(self) -> None:
        """Store the centroids at 16 bits: rounded to float16 (the model computes with the rounded values)."""
        self.centroids.copy_(self.centroids.half().to(self.centroids.dtype))
        self.codebook_bits = 16

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        shared = self.centroids[self.codes.clamp_min(0)]
        return torch.where(self.codes >= 0, shared, torch.zeros_like(shared)).to(weight.dtype)

    @property
    def header_bits(self) -> int:
        return self.codebook_bits * self.centroids.numel()
