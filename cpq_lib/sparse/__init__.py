"""Sparse networks: magnitude pruning and lossless coding of quantized codes and sparsity patterns."""

from .coding import CODERS, CodedStream, decode, empirical_entropy_bits, encode, positions_from_gaps, relative_indices
from .pruning import (
    SCOPES, check_sparsity, cubic_schedule, magnitude_prune_, make_permanent_, prepare_masks_, prunable_layers, pruned_names,
    sparsity_table,
)

__all__ = [
    "CODERS", "CodedStream", "SCOPES", "check_sparsity", "cubic_schedule", "decode", "empirical_entropy_bits", "encode",
    "magnitude_prune_", "make_permanent_", "positions_from_gaps", "prepare_masks_", "prunable_layers", "pruned_names",
    "relative_indices", "sparsity_table",
]
