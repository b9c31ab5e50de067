"""Bit allocation: per-channel bit-widths under an average-bit budget (uniform, random, class count,
sensitivity, class critical paths), each searching on validation data only."""

from .class_paths import channel_bits
from .evaluator import SearchEvaluator
from .registry import ALLOCATORS, NEEDS_SCORES, OPTIONAL, allocate
from .report import bits_and_class_counts, bits_per_layer, class_bits_table, comparison_table, plan_digest
from .search import AllocationResult, SearchLog
from .space import AllocationError, ChannelSpace, Target

__all__ = ["ALLOCATORS", "NEEDS_SCORES", "OPTIONAL", "AllocationError", "AllocationResult", "ChannelSpace", "SearchEvaluator", "SearchLog", "Target",
           "allocate", "bits_and_class_counts", "bits_per_layer", "channel_bits", "class_bits_table", "comparison_table",
           "plan_digest"]
