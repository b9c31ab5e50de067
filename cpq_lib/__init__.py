"""cpq: mixed-precision, per-channel neural-network quantization research library."""

__version__ = "0.1.0"
