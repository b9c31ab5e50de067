"""The reference ClassPathQ preset on a hand-computable case: scores, paths, order, both phases, plan.

Two layers of four channels (one parameter each, so the average is the mean), three classes, target
W2 (reference a2w2 settings: T1 0.9, R 0.8, shared threshold, interference), sparsity 0.6. The accuracy
of a plan is 0.9 - 0.02 * sum_k importance_k * (4 - bits_k), so every decision can be checked by hand
(the derivation is in the comments).
"""

from __future__ import annotations

import pytest
import torch

from cpq_lib.allocation import ChannelSpace, Target, allocate
from cpq_lib.allocation.class_paths import preset_settings, reference_settings, search_order, search_paths
from cpq_lib.classpath import UNIMPORTANT, ClassScores
from cpq_lib.train import EvalResult

SCORES = {  # channels a0..a3 | b0..b3
    "a": torch.tensor([[1.0, 1.0, 0.5, 0.0], [1.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.0, 0.0]]),
    "b": torch.tensor([[0.2, 0.0, 0.0, 0.0], [0.0, 1.0, 0.0, 0.0], [1.0, 1.0, 1.0, 0.3]]),
}
IMPORTANCE = torch.tensor([3.0, 1.0, 2.0, 1.0, 1.0, 3.0, 1.0, 0.5])


class HandEvaluator:
    """What a search sees of an evaluator, with an accuracy that is a known function of the bits."""

    def __init__(self) -> None:
        self.space = ChannelSpace(["a", "b"], [4, 4], [1, 1])
        self.evaluations, self.seconds, self.images, self.seen = 0, 0.0, 100, []

    def evaluate(self, bits: torch.Tensor) -> EvalResult:
        self.evaluations += 1
        self.seen.append(bits.tolist())
        accuracy = 0.9 - 0.02 * float((IMPORTANCE * (4 - bits).double()).sum())
        return EvalResult(accuracy, 1.0 - accuracy, [accuracy] * 3, 100)


def scores() -> ClassScores:
    return ClassScores(dict(SCORES), ["c0", "c1", "c2"], [10, 10, 10], [], {})


def test_reference_paths_use_one_shared_threshold_with_ties_included():
    settings = preset_settings("reference", Target(2, 2))
    assert (settings.t1, settings.r, settings.threshold, settings.similarity) == (0.9, 0.8, "shared", "interference")
    # 24 scores, k = int(0.4 * 24) = 9: the 9th largest is 0.5, and all three 0.5s are kept (10 entries)
    paths = search_paths(scores(), ["a", "b"], 0.6, settings, seed=0)
    flat = paths.flat()
    assert flat.tolist() == [[True, True, True, False, False, False, False, False],   # c0: a0 a1 a2
                             [True, False, True, True, False, True, False, False],    # c1: a0 a2 a3 b1
                             [False, False, False, False, True, True, True, False]]   # c2: b0 b1 b2
    assert int(flat.sum()) == 10 and not bool(flat[:, 7].any())  # b3 is the unimportant set


def test_reference_order_is_ascending_row_sums_with_the_unimportant_set_swapped_to_loc():
    settings = preset_settings("reference", Target(2, 2))
    paths = search_paths(scores(), ["a", "b"], 0.6, settings, seed=0)
    # interference rows (path i, score of j), diagonal included: c0 2.5+1.5+0 = 4.0, c1 1.5+3+1 = 5.5, c2 .2+1+3 = 4.2
    # ascending: c0, c2, c1; append U; swap U with position C // 2 = 1: c0, U, c1, c2
    assert search_order(paths, scores(), 0.6, settings) == ["c0", UNIMPORTANT, "c1", "c2"]
    # at sparsity 0.9 the unimportant set stays last (loc = C)
    assert search_order(paths, scores(), 0.9, settings) == ["c0", "c2", "c1", UNIMPORTANT]
    reversed_order = preset_settings("reference", Target(2, 2), order="descending")
    assert search_order(paths, scores(), 0.6, reversed_order) == ["c1", UNIMPORTANT, "c0", "c2"]


def test_reference_search_makes_the_hand_computed_plan():
    evaluator = HandEvaluator()
    result = allocate("classpath", evaluator, Target(2, 2), scores=scores(), sparsities=[0.6], progress=False)
    # acc0 0.9, chance 1/3, threshold 0.8433.  Phase 1, order c0, U, c1, c2:
    #   c0 -> 3, 2 lowers a1 only (0.88, 0.86); c0 -> 1: 0.84 < 0.8433, undone; threshold -> 0.7413
    #   U -> 3, 2, 1 lowers b3 (0.85, 0.84, 0.83)
    #   c1 -> 3 lowers a0, a2, a3: 0.71 < 0.7413, undone; threshold -> 0.6597
    #   c2 -> 3, 2, 1 lowers b0, b2 (0.79, 0.75, 0.71); average 21 / 8 = 2.625
    # Phase 2, lowest-first among classes at >= 2 bits: c0 (2 -> 1, average 2.5), then c1 (4 -> 3, average 2.0)
    assert result.details["order"] == ["c0", UNIMPORTANT, "c1", "c2"]
    assert result.details["class_bits"] == {"c0": 1, UNIMPORTANT: 1, "c1": 3, "c2": 1}
    assert result.plan.layers["a"].weight == [3, 1, 3, 3] and result.plan.layers["b"].weight == [1, 3, 1, 1]
    assert result.plan.meta["average_bits"] == pytest.approx(2.0)
    assert result.details["final_threshold"] == pytest.approx(((0.51 * 0.8) * 0.8) + 1 / 3)
    assert evaluator.evaluations == 13 and result.cost["evaluations"] == 13
    phases = result.trajectory["phase"].str.split().str[-1].tolist()
    assert phases == ["start"] + ["1"] * 10 + ["2"] * 2
    assert result.trajectory["accepted"].tolist().count(False) == 2  # the two undone steps
    assert result.accuracy == pytest.approx(0.9 - 0.02 * float((IMPORTANCE * (4 - torch.tensor([3, 1, 3, 3, 1, 3, 1, 1]))).sum()))


def test_reference_keeps_the_plan_with_the_highest_average_bits():
    evaluator = HandEvaluator()
    result = allocate("classpath", evaluator, Target(2, 2), scores=scores(), sparsities=[0.6, 0.3], progress=False)
    per = result.details["per_sparsity"]
    best = max(per, key=lambda s: per[s]["average_bits"])
    assert result.details["sparsity"] == float(best)
    cpq = allocate("classpath_cpq", HandEvaluator(), Target(2, 2), scores=scores(), sparsities=[0.6, 0.3], progress=False)
    per = cpq.details["per_sparsity"]
    assert cpq.details["sparsity"] == float(max(per, key=lambda s: (per[s]["accuracy"], -list(per).index(s))))


def test_reference_settings_follow_the_cifar10_configs():
    assert reference_settings(Target(2, 2)) == {"t1": 0.9, "r": 0.8, "threshold": "shared", "similarity": "interference"}
    assert reference_settings(Target(3, 3)) == {"t1": 0.9, "r": 0.7, "threshold": "per_class", "similarity": "interference"}
    assert reference_settings(Target(4, 4)) == {"t1": 0.95, "r": 0.9, "threshold": "per_class", "similarity": "interference"}
    settings = preset_settings("reference", Target(2, 2))
    assert (settings.phase2, settings.fill, settings.select, settings.min_bits, settings.unimportant_min_bits) == \
        ("lowest_first", False, "highest_bits", 1, 1)


def test_random_paths_keep_every_class_and_layer_size_and_are_seeded():
    settings = preset_settings("reference", Target(2, 2), paths="random")
    class_paths = search_paths(scores(), ["a", "b"], 0.6, preset_settings("reference", Target(2, 2)), seed=0)
    drawn = search_paths(scores(), ["a", "b"], 0.6, settings, seed=0)
    again = search_paths(scores(), ["a", "b"], 0.6, settings, seed=0)
    other = search_paths(scores(), ["a", "b"], 0.6, settings, seed=1)
    for name in ("a", "b"):
        assert drawn.masks[name].sum(1).tolist() == class_paths.masks[name].sum(1).tolist()
        assert torch.equal(drawn.masks[name], again.masks[name])
    assert not all(torch.equal(drawn.masks[n], other.masks[n]) for n in ("a", "b"))
    assert not all(torch.equal(drawn.masks[n], class_paths.masks[n]) for n in ("a", "b"))
