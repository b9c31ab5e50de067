"""Post-training quantization studies: granularity sweeps (and PTQ-SL's sub-layerwise scale search)."""

from .sweep import granularity_sweep

__all__ = ["granularity_sweep"]
