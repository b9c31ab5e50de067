"""Sparse networks: lossless coding of quantized codes and sparsity patterns (pruning and focused quantization to come)."""

from .coding import CODERS, CodedStream, decode, empirical_entropy_bits, encode, positions_from_gaps, relative_indices

__all__ = ["CODERS", "CodedStream", "decode", "empirical_entropy_bits", "encode", "positions_from_gaps", "relative_indices"]
