"""The AIMET arm: its front read into plans, the point at the budget, the rest of the budget spent by its
phase 1; end to end with AIMET where it is installed (an optional dependency), a clear error where not."""

import copy

import pytest
import torch

from cpq_lib.allocation import AllocationError, ChannelSpace, SearchEvaluator, Target, allocate
from cpq_lib.allocation import aimet_amp
from cpq_lib.allocation.aimet_amp import Flip, choose_front_point, loss_rise_table, prefix_plans
from cpq_lib.allocation.budgets import ChannelBudget

SPACE = ChannelSpace(["a", "b", "c"], [2, 1, 1], [10, 20, 40])  # 20 + 20 + 40 weights


def test_prefix_plans_apply_aimet_flips_in_order_from_the_top_width():
    flips = [Flip(("c",), 3, 0.9), Flip(("stem",), 2, 0.9), Flip(("a", "b"), 2, 0.8), Flip(("c",), 2, 0.7), Flip(("c",), 3, 0.6)]
    plans = prefix_plans(SPACE, flips, 4)
    assert [p.tolist() for p in plans] == [
        [4, 4, 4, 3],
        [4, 4, 4, 3],        # a layer the plan does not set (kept in full precision) changes nothing
        [2, 2, 2, 3],        # a group of two layers flips both
        [2, 2, 2, 2],
        [2, 2, 2, 3],        # a later flip of the same group overrides the earlier one, as AIMET sets them
    ]
    assert all(p is not q for p, q in zip(plans, plans[1:]))  # each point is its own tensor


def test_the_front_point_is_the_one_with_most_bits_within_every_budget():
    plans = [SPACE.uniform(4), torch.tensor([4, 4, 4, 3]), torch.tensor([2, 2, 2, 3]), torch.tensor([2, 2, 2, 2]),
             torch.tensor([3, 3, 3, 2])]
    # averages 4, 3.5, 2.5, 2, 2.5: at 2.6 bits the 2.5 points qualify; the first of equal ones is kept
    assert choose_front_point(SPACE, plans, 2.6) == 2
    assert choose_front_point(SPACE, plans, 3.5) == 1
    assert choose_front_point(SPACE, plans, 1.5) is None
    # a second budget that only the last point keeps (channel 0 at most 3 bits... and the others cheap)
    budget = ChannelBudget("GBitOPs", torch.tensor([1.0, 0.0, 0.0, 0.0]), 3.0)
    assert choose_front_point(SPACE, plans[:3], 4.0, [budget]) == 2
    assert choose_front_point(SPACE, plans, 2.6, [ChannelBudget("bytes", torch.tensor([0.0, 0.0, 1.0, 0.0]), 2.0)]) == 2


def test_phase1_becomes_a_rise_table_with_zero_at_the_top_and_gaps_filled_from_above():
    flips = [Flip(("a",), 3, 0.85), Flip(("a",), 2, 0.5), Flip(("b",), 2, 0.8), Flip(("stem",), 2, 0.1)]
    rise = loss_rise_table(SPACE, flips, 0.9, [2, 3, 4])
    assert rise[0, 4] == 0.0 and rise[0, 3] == pytest.approx(0.05) and rise[0, 2] == pytest.approx(0.4)
    assert rise[1, 3] == 0.0 and rise[1, 2] == pytest.approx(0.1)   # 3 bits not measured: the 4-bit value
    assert all(rise[2, b] == 0.0 for b in (2, 3, 4))                  # never measured


def test_without_aimet_the_arm_says_how_to_install_it(monkeypatch, digits):
    monkeypatch.setattr(aimet_amp, "aimet_available", lambda: False)
    with pytest.raises(AllocationError, match=r"needs AIMET: pip install -r benchmarks/requirements-peers\.txt"):
        aimet_amp.aimet(None, Target(2.0, 4))
    monkeypatch.setattr(aimet_amp, "aimet_available", lambda: True)
    with pytest.raises(AllocationError, match="aimet widths 3..2 must lie in 1..16"):
        aimet_amp.aimet(type("E", (), {"space": SPACE})(), Target(2.0, 4), min_bits=3, start_bits=2)


@pytest.mark.skipif(not aimet_amp.aimet_available(), reason="needs aimet-torch (optional: pip install -r benchmarks/requirements-peers.txt)")
@pytest.mark.parametrize("act_bits", [4, 2])  # AIMET refuses activations below 4 bits: its phases then run at 4
def test_aimet_runs_on_the_quick_model_and_its_plan_is_its_front_point_plus_the_slack(digits_baseline, digits, act_bits):
    from cpq_lib.quant import QuantConfig, calibrate_, quantize_

    data = digits.for_search()
    student = quantize_(copy.deepcopy(digits_baseline[0]),
                        QuantConfig(weight_bits=8, act_bits=act_bits, weight_init="mse", act_init="mse")).eval()
    calibrate_(student, data.calibration_loader(256))
    evaluator = SearchEvaluator(student, data, bn_images=64)
    target = Target(2.0, act_bits)
    result = allocate("aimet", evaluator, target, progress=False, min_bits=1)
    space = evaluator.space
    details = result.details
    assert len(details["front"]) == len(details["phase1"]) > len(space.names)
    flips = [Flip(tuple(f["layers"]), f["bits"], f["accuracy"]) for f in details["phase1"]]
    plans = prefix_plans(space, flips, 4)
    index = choose_front_point(space, plans, target.max_bits)
    assert details["front_point"] == index + 1
    assert details["layer_bits"] == {n: int(plans[index][space.offsets[i]]) for i, n in enumerate(space.names)}
    bits = space.from_plan(result.plan)
    assert (bits >= plans[index]).all()  # the slack only raises channels
    assert target.max_bits - 0.01 <= result.plan.meta["average_bits"] <= target.max_bits + 1e-9
    assert result.accuracy == pytest.approx(evaluator.evaluate(bits).accuracy)  # evaluated at the point's activations
    assert details["aimet_act_bits"] == max(act_bits, 4)


@pytest.mark.parametrize(("act_bits", "aimet_act_bits"), [(2, 4), (3, 4), (4, 4), (8, 8)])
def test_aimet_runs_at_the_points_activation_bits_or_its_minimum_of_4(monkeypatch, act_bits, aimet_act_bits):
    """AIMET refuses activations below 4 bits: only then do its phases run at 4 (checked without AIMET)."""
    seen = []

    class Stop(Exception):
        pass

    def fake_run_aimet(evaluator, act, widths, folder):
        seen.append(act)
        raise Stop

    monkeypatch.setattr(aimet_amp, "aimet_available", lambda: True)
    monkeypatch.setattr(aimet_amp, "run_aimet", fake_run_aimet)
    evaluator = type("E", (), {"space": SPACE, "evaluations": 0, "seconds": 0.0})()
    with pytest.raises(Stop):
        aimet_amp.aimet(evaluator, Target(2.0, act_bits), progress=False)
    assert seen == [aimet_act_bits]
