"""Class critical paths: class-importance scoring, paths, similarity, ordering, sensitivity."""

from .analysis import class_count_frame, depth_summary, informativeness, total_similarity
from .paths import (
    UNIMPORTANT, CriticalPaths, PathError, class_order, critical_paths, interference_matrix, jaccard_matrix, path_overlap,
    random_paths,
)
from .sensitivity import layer_sensitivity, path_sensitivity
from .scoring import ClassScores, ScoreSettings, ScoringError, cached_scores, score_classes

__all__ = [
    "class_count_frame", "depth_summary", "informativeness", "total_similarity",
    "UNIMPORTANT", "ClassScores", "CriticalPaths", "PathError", "ScoreSettings", "ScoringError", "cached_scores",
    "class_order", "critical_paths", "interference_matrix", "jaccard_matrix", "layer_sensitivity", "path_overlap",
    "path_sensitivity", "random_paths", "score_classes",
]
