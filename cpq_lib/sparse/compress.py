"""Coded size of a pruned, quantized model and its exact decode: the compression-ratio bookkeeping.

A coded layer is two streams and a header:

- the sparsity pattern as Deep Compression's relative indices (gaps capped at ``max_gap``, a filler
  entry for longer runs), coded with the chosen coder;
- one code per stored entry (fillers get the pruned code -1), coded with the same coder;
- the header: what turns codes back into weights (focused layout or k-means codebook, layer scale),
  counted by the caller in ``header_bits``, plus the weight shape (32 bits per dimension).

Everything else the model needs (biases, BatchNorm, layers left in full precision) counts at 32 bits;
bookkeeping buffers (``num_batches_tracked``) are not stored. The fp32 reference is every stored
tensor at 32 bits, so the ratio compares like with like.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..quant.metrics import is_bookkeeping
from .coding import CODERS, CodedStream, decode, empirical_entropy_bits, encode, positions_from_gaps, relative_indices

SHAPE_BITS = 32
WEIGHT_KEYS = ("weight", "weight_orig", "parametrizations.weight.original")
FLOAT_BITS = 32


@dataclass(frozen=True)
class CodedLayer:
    shape: tuple[int, ...]
    gaps: CodedStream
    codes: CodedStream
    header_bits: int

    @property
    def bits(self) -> int:
        return self.gaps.bits + self.codes.bits + self.header_bits + SHAPE_BITS * len(self.shape)


def code_layer(codes: torch.Tensor, header_bits: int, coder: str = "ans", max_gap: int = 255) -> CodedLayer:
    """Code a layer's integer codes (-1 where pruned)."""
    flat = codes.detach().cpu().flatten().numpy().astype(np.int64)
    gaps, _ = relative_indices(flat >= 0, max_gap)
    stored = flat[positions_from_gaps(gaps)] if len(gaps) else np.empty(0, dtype=np.int64)
    return CodedLayer(tuple(codes.shape), encode(gaps, coder), encode(stored, coder), int(header_bits))


def decode_layer(layer: CodedLayer) -> torch.Tensor:
    """The codes tensor (-1 where pruned) back from a coded layer."""
    gaps, stored = decode(layer.gaps), decode(layer.codes)
    flat = np.full(int(np.prod(layer.shape)), -1, dtype=np.int64)
    flat[positions_from_gaps(gaps)] = stored
    return torch.from_numpy(flat).view(layer.shape)


def compression_table(model: nn.Module, layer_codes: dict[str, tuple[torch.Tensor, int]], coders=CODERS,
                      max_gap: int = 255) -> pd.DataFrame:
    """Per coder: coded bits per layer, the rest of the model at fp32, totals and the ratio vs fp32.

    ``layer_codes`` maps a layer name to (codes, header bits); its ``weight`` is then not counted at fp32.
    Rows: one per (coder, layer) plus a ``total`` row per coder with ``ratio`` = fp32 bits / coded bits (the
    whole model, what cpq reports first) and ``coded_layers_ratio`` = the coded layers' weights at fp32 /
    their coded bits (what the paper's ResNet-50 figure counts: conv weights only).
    Each layer row also gives the empirical entropy of its two streams (the order-0 bound), the coder's
    payload bits (to compare with it) and its table / model bits (alphabet, code lengths or counts).
    """
    unknown = [c for c in coders if c not in CODERS]
    if unknown:
        raise ValueError(f"coders {unknown} not allowed; choose from {list(CODERS)}")
    state = model.state_dict()
    missing = [name for name in layer_codes if not any(f"{name}.{s}" in state for s in WEIGHT_KEYS)]
    if missing:
        raise ValueError(f"no layer(s) {missing[:3]} with a weight in the model")
    coded = tuple(f"{name}.{s}" for name in layer_codes for s in ("weight", "weight_orig", "weight_mask", "parametrizations."))
    rest = FLOAT_BITS * sum(t.numel() for k, t in state.items()
                            if not k.startswith(coded) and _stored_at_fp32(k, t))
    reference = float_bits(model)
    entropy = {name: _stream_entropy(codes, max_gap) for name, (codes, _) in layer_codes.items()}  # same for every coder
    coded_float = FLOAT_BITS * sum(int(codes.numel()) for codes, _ in layer_codes.values())
    rows = []
    for coder in coders:
        total = rest
        for name, (codes, header_bits) in layer_codes.items():
            layer = code_layer(codes, header_bits, coder, max_gap)
            rows.append({"coder": coder, "layer": name, "weights": int(codes.numel()), "nonzero": int((codes >= 0).sum()),
                         "index_bits": layer.gaps.bits, "code_bits": layer.codes.bits,
                         "payload_bits": layer.gaps.payload_bits + layer.codes.payload_bits,
                         "table_bits": layer.gaps.table_bits + layer.codes.table_bits,
                         "header_bits": layer.bits - layer.gaps.bits - layer.codes.bits,
                         "bits": layer.bits,
                         "entropy_bits": entropy[name]})
            total += layer.bits
        rows.append({"coder": coder, "layer": "total", "weights": sum(int(c.numel()) for c, _ in layer_codes.values()),
                     "nonzero": sum(int((c >= 0).sum()) for c, _ in layer_codes.values()), "index_bits": None,
                     "code_bits": None, "payload_bits": None, "table_bits": None, "header_bits": None, "bits": total, "entropy_bits": None,
                     "ratio": reference / total, "coded_layers_ratio": coded_float / max(total - rest, 1)})
    return pd.DataFrame(rows)


def float_bits(model: nn.Module) -> int:
    """The model at fp32: every parameter and stored buffer at 32 bits (a pruned weight once, masks and
    bookkeeping buffers not at all)."""
    return FLOAT_BITS * sum(t.numel() for k, t in model.state_dict().items() if _stored_at_fp32(k, t))


def _stored_at_fp32(key: str, tensor: torch.Tensor) -> bool:
    """Tensors a plain fp32 model stores: not masks, bookkeeping, or a parametrization's own state."""
    if is_bookkeeping(key) or not tensor.is_floating_point() or key.endswith(".weight_mask"):
        return False
    return ".parametrizations." not in key or key.endswith(".original")


def _stream_entropy(codes: torch.Tensor, max_gap: int) -> float:
    flat = codes.detach().cpu().flatten().numpy().astype(np.int64)
    gaps, _ = relative_indices(flat >= 0, max_gap)
    stored = flat[positions_from_gaps(gaps)] if len(gaps) else np.empty(0, dtype=np.int64)
    return empirical_entropy_bits(gaps) + empirical_entropy_bits(stored)
