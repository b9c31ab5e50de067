"""Paths, similarity matrices and ordering on hand-made scores with known answers."""

import pytest
import torch

from cpq_lib.classpath import (
    UNIMPORTANT, ClassScores, PathError, class_order, critical_paths, interference_matrix, jaccard_matrix, path_overlap,
)


def make_scores():
    # 3 classes, layer "a" with 4 channels, layer "b" with 2 channels
    a = torch.tensor([[0.9, 0.8, 0.1, 0.0],
                      [0.9, 0.1, 0.7, 0.0],
                      [0.2, 0.1, 0.3, 0.0]])
    b = torch.tensor([[1.0, 0.0],
                      [0.0, 1.0],
                      [0.6, 0.5]])
    return ClassScores({"a": a, "b": b}, ["x", "y", "z"], [5, 5, 5], [], {})


def test_per_class_top_half_per_layer():
    paths = critical_paths(make_scores(), sparsity=0.5)
    assert paths.masks["a"].int().tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0]]
    assert paths.masks["b"].int().tolist() == [[1, 0], [0, 1], [1, 0]]
    assert paths.unimportant()["a"].int().tolist() == [0, 0, 0, 1]
    assert paths.unimportant()["b"].int().tolist() == [0, 0]


def test_ties_break_towards_lower_channel_index():
    scores = ClassScores({"a": torch.ones(2, 4)}, ["x", "y"], [1, 1], [], {})
    paths = critical_paths(scores, sparsity=0.5)
    assert paths.masks["a"].int().tolist() == [[1, 1, 0, 0], [1, 1, 0, 0]]


def test_shared_threshold_keeps_more_for_confident_classes():
    paths = critical_paths(make_scores(), sparsity=0.5, threshold="shared")
    # top half of the 12 layer-"a" scores: 0.9, 0.9, 0.8, 0.7, 0.3, 0.2 -> cut at 0.2
    assert paths.masks["a"].int().tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [1, 0, 1, 0]]
    assert paths.masks["a"][2].sum() == 2
    strict = critical_paths(make_scores(), sparsity=0.75, threshold="shared")
    assert strict.masks["a"].int().tolist() == [[1, 1, 0, 0], [1, 0, 0, 0], [0, 0, 0, 0]]


def test_model_scope_ranks_across_layers():
    paths = critical_paths(make_scores(), sparsity=0.5, scope="model")  # keep 3 of 6 channels per class
    assert paths.masks["a"].int().tolist() == [[1, 1, 0, 0], [1, 0, 1, 0], [0, 0, 1, 0]]
    assert paths.masks["b"].int().tolist() == [[1, 0], [0, 1], [1, 1]]


def test_jaccard_and_interference():
    paths = critical_paths(make_scores(), sparsity=0.5)
    # flat paths: x = {a0, a1, b0}, y = {a0, a2, b1}, z = {a0, a2, b0}
    jaccard = jaccard_matrix(paths)
    assert torch.allclose(jaccard, torch.tensor([[1.0, 1 / 5, 2 / 4], [1 / 5, 1.0, 2 / 4], [2 / 4, 2 / 4, 1.0]], dtype=torch.float64))
    interference = interference_matrix(paths, make_scores())
    # I[x, y] = y's scores on x's path = 0.9 + 0.1 + 0.0
    assert interference[0, 1].item() == pytest.approx(1.0)
    assert interference[2, 2].item() == pytest.approx(0.2 + 0.3 + 0.6)


def test_order_by_total_similarity_with_pseudo_class():
    similarity = torch.tensor([[1.0, 0.2, 0.5], [0.2, 1.0, 0.5], [0.5, 0.5, 1.0]])
    assert class_order(similarity, ["x", "y", "z"]) == [UNIMPORTANT, "z", "x", "y"]
    assert class_order(similarity, ["x", "y", "z"], descending=False, unimportant_first=False) == ["x", "y", "z", UNIMPORTANT]
    with pytest.raises(PathError, match="3x3 but there are 2"):
        class_order(similarity, ["x", "y"])


def test_overlap_table_and_sizes():
    paths = critical_paths(make_scores(), sparsity=0.5)
    overlap = path_overlap(paths).set_index("layer")
    assert overlap.loc["a", "unimportant_share"] == 0.25
    assert overlap.loc["b", "mean_jaccard"] == pytest.approx((0 + 1 + 0) / 3)
    sizes = paths.path_sizes()
    assert set(sizes["class"]) == {"x", "y", "z", UNIMPORTANT}


@pytest.mark.parametrize("kwargs,message", [({"sparsity": 1.0}, "sparsity"), ({"sparsity": 0.5, "threshold": "max"}, "threshold"),
                                            ({"sparsity": 0.5, "scope": "net"}, "scope"), ({"sparsity": 0.5, "layers": ["c"]}, "no scores")])
def test_bad_settings(kwargs, message):
    with pytest.raises(PathError, match=message):
        critical_paths(make_scores(), **kwargs)
