"""Score summaries on hand-made scores with known answers."""

import pytest
import torch

from cpq_lib.classpath import (
    ClassScores, class_count_frame, critical_paths, depth_summary, informativeness, interference_matrix, total_similarity,
)


def _scores():
    a = torch.tensor([[1.0, 0.5, 0.0, 0.96],
                      [1.0, 0.1, 0.0, 0.97]])   # channel 0 and 3 universal, channel 2 dead
    b = torch.tensor([[0.2, 0.8],
                      [0.6, 0.4]])
    return ClassScores({"a": a, "b": b}, ["x", "y"], [3, 3], ["b"], {})


def test_depth_summary():
    table = depth_summary(_scores()).set_index("layer")
    assert table.loc["a", "universal"] == 0.5 and table.loc["a", "dead"] == 0.25
    assert table.loc["a", "mean_class_count"] == pytest.approx((2.0 + 0.6 + 0.0 + 1.93) / 4)
    assert table.loc["b", "universal"] == 0.0 and bool(table.loc["b", "full_precision"])
    assert list(table["depth"]) == [0, 1]


def test_informativeness_compares_aggregations():
    saturated = ClassScores({"a": torch.ones(2, 4), "b": torch.ones(2, 2)}, ["x", "y"], [3, 3], [], {})
    table = informativeness({"position": _scores(), "image": saturated}).set_index(["aggregate", "layer"])
    assert table.loc[("image", "a"), "saturated_share"] == 1.0 and table.loc[("position", "a"), "saturated_share"] == 0.5
    assert table.loc[("image", "a"), "class_count_median"] == 2.0
    assert table.loc[("position", "b"), "class_count_median"] == pytest.approx(1.0)


def test_class_count_frame_and_total_similarity():
    frame = class_count_frame(_scores())
    assert len(frame) == 6 and frame[frame["layer"] == "a"]["class count"].tolist() == pytest.approx([2.0, 0.6, 0.0, 1.93])
    similarity = torch.tensor([[1.0, 0.2, 0.3], [0.2, 1.0, 0.5], [0.3, 0.5, 1.0]])
    assert total_similarity(similarity).tolist() == pytest.approx([0.5, 0.7, 0.8])


def test_normalized_interference_is_a_mean_score_per_path_channel():
    scores = _scores()
    paths = critical_paths(scores, sparsity=0.5)  # x: a0, a3, b1; y: a0, a3, b0
    raw = interference_matrix(paths, scores)
    normalized = interference_matrix(paths, scores, normalize=True)
    assert raw[0, 1].item() == pytest.approx(1.0 + 0.97 + 0.4)
    assert normalized[0, 1].item() == pytest.approx((1.0 + 0.97 + 0.4) / 3)
    assert float(normalized.max()) <= 1.0
