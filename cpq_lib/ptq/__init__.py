"""Post-training quantization: granularity sweeps and PTQ-SL (sub-layerwise scales, scale search, channel reordering)."""

from .reorder import REORDER_METHODS, permute_channels_, reorder_channels_, reorder_groups
from .search import METRICS, ScaleSearchConfig, search_scales_
from .study import (
    DEFAULT_GRANULARITIES, accuracy_table, granularity_correlation, markdown_report, parse_target, ptqsl_study, reordering_verdict,
)
from .sweep import granularity_sweep

__all__ = [
    "DEFAULT_GRANULARITIES", "METRICS", "accuracy_table", "markdown_report", "REORDER_METHODS", "ScaleSearchConfig", "granularity_correlation", "granularity_sweep",
    "parse_target", "permute_channels_", "ptqsl_study", "reorder_channels_", "reorder_groups", "reordering_verdict",
    "search_scales_",
]
