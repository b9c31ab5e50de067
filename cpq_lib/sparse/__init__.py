"""Sparse networks: magnitude pruning, focused (power-of-two mixture) quantization, lossless coding."""

from .coding import CODERS, CodedStream, decode, empirical_entropy_bits, encode, positions_from_gaps, relative_indices
from .focused import FocusedLayout, FocusedWeightQuantizer, LayerMixture, decode_levels, fit_mixture, plan_layer, quantize_levels
from .pruning import (
    SCOPES, check_sparsity, cubic_schedule, magnitude_prune_, make_permanent_, prepare_masks_, prunable_layers, pruned_names,
    sparsity_table,
)

__all__ = [
    "CODERS", "CodedStream", "FocusedLayout", "FocusedWeightQuantizer", "LayerMixture", "SCOPES", "check_sparsity", "cubic_schedule", "decode", "decode_levels", "empirical_entropy_bits", "encode", "fit_mixture", "plan_layer", "quantize_levels",
    "magnitude_prune_", "make_permanent_", "positions_from_gaps", "prepare_masks_", "prunable_layers", "pruned_names",
    "relative_indices", "sparsity_table",
]
