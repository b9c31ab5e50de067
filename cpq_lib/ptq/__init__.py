"""Post-training quantization: granularity sweeps and PTQ-SL (sub-layerwise scales, scale search, channel reordering)."""

from .channel_graph import ChannelSpace, channel_spaces
from .contrasts import choose_layouts, mean_over_seeds, reordering_contrasts
from .reorder import (
    INDEX_METHODS, REORDER_METHODS, apply_space_permutation_, permute_channels_, permute_reorder_, reorder_channels_,
    reorder_groups, space_order,
)
from .search import METRICS, ScaleSearchConfig, search_scales_
from .study import (
    DEFAULT_GRANULARITIES, accuracy_table, granularity_correlation, layout_metadata, markdown_report, parse_target,
    ptqsl_study, read_study_csv, reordering_verdict,
)
from .sweep import granularity_sweep

__all__ = [
    "ChannelSpace", "DEFAULT_GRANULARITIES", "INDEX_METHODS", "METRICS", "REORDER_METHODS", "ScaleSearchConfig",
    "accuracy_table", "apply_space_permutation_", "channel_spaces", "granularity_correlation", "granularity_sweep",
    "choose_layouts", "layout_metadata", "markdown_report", "mean_over_seeds", "parse_target", "permute_channels_", "permute_reorder_", "ptqsl_study",
    "read_study_csv", "reorder_channels_", "reorder_groups", "reordering_contrasts", "reordering_verdict", "search_scales_", "space_order",
]
