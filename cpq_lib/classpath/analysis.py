"""Summaries of class scores and paths that notebooks and reports show: per-layer depth profiles,
informativeness of the scores, class-count tables, total similarity."""

from __future__ import annotations

import pandas as pd
import torch

from .scoring import ClassScores

SATURATED = 0.95  # a channel scoring at least this for every class is "important to every class"


def class_count_frame(scores: ClassScores) -> pd.DataFrame:
    """Tidy table: layer, depth, channel, class count (sum of the channel's class scores, in [0, C])."""
    frames = [pd.DataFrame({"layer": name, "depth": depth, "channel": range(len(count)), "class count": count.numpy()})
              for depth, (name, count) in enumerate(scores.class_count().items())]
    return pd.concat(frames, ignore_index=True)


def depth_summary(scores: ClassScores, saturated: float = SATURATED) -> pd.DataFrame:
    """Per scored layer, in forward order: mean score, mean class count, and the shares of channels that
    score >= ``saturated`` for every class ("universal") or 0 for every class ("dead")."""
    rows = []
    for depth, (name, score) in enumerate(scores.scores.items()):
        rows.append({"depth": depth, "layer": name, "full_precision": name in scores.full_precision,
                     "channels": score.shape[1], "mean_score": float(score.double().mean()),
                     "mean_class_count": float(score.double().sum(0).mean()),
                     "universal": float((score >= saturated).all(0).double().mean()),
                     "dead": float((score <= 0).all(0).double().mean())})
    return pd.DataFrame(rows)


def informativeness(by_aggregate: dict[str, ClassScores], saturated: float = SATURATED) -> pd.DataFrame:
    """Per layer and aggregation: share of channels saturated for every class, and class-count quartiles.

    Scores that mark nearly every channel important to every class (share near 1, quartiles near C)
    cannot tell classes apart; critical paths built on them are decided by ties.
    """
    rows = []
    for aggregate, scores in by_aggregate.items():
        for name, score in scores.scores.items():
            count = score.double().sum(0)
            q1, median, q3 = torch.quantile(count, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
            rows.append({"aggregate": aggregate, "layer": name, "saturated_share": float((score >= saturated).all(0).double().mean()),
                         "class_count_q1": q1, "class_count_median": median, "class_count_q3": q3})
    return pd.DataFrame(rows)


def total_similarity(similarity: torch.Tensor) -> torch.Tensor:
    """Each class's summed similarity to the other classes (the diagonal excluded)."""
    return similarity.sum(1) - similarity.diagonal()
