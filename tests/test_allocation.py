"""Allocators: every one meets its budget with a valid plan; the searches' building blocks against
brute force and hand-made scores; searches cannot see the test split."""

import copy
import itertools
import random

import pytest
import torch

from cpq_lib.allocation import (
    ALLOCATORS, AllocationError, ChannelSpace, SearchEvaluator, Target, allocate, channel_bits,
)
from cpq_lib.allocation.baselines import pareto_knapsack
from cpq_lib.allocation.class_count import bits_from_borders
from cpq_lib.classpath import ClassScores
from cpq_lib.errors import DataError
from cpq_lib.quant import QuantConfig, calibrate_, quantize_, quantized_layers

from helpers import allocator_params, installed_allocators


@pytest.fixture(scope="module")
def search(digits_baseline, digits):
    """The trained digits model, quantized (MSE scales) and calibrated on training images, and its scores."""
    from cpq_lib.classpath import score_classes

    model = digits_baseline[0]
    data = digits.for_search()
    student = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=8, act_bits=4, weight_init="mse", act_init="mse")).eval()
    calibrate_(student, data.calibration_loader(256))
    scores = score_classes(model, data.per_class_loader(20), 10, data.classes, progress=False)
    return student, data, scores


_ALLOCATED: dict = {}


def allocated(search, method: str, bits: float):
    """Each allocator's search on the quick model, made once per session for the tests that read it."""
    if (method, bits) not in _ALLOCATED:
        student, data, scores = search
        evaluator = SearchEvaluator(student, data, bn_images=64)
        result = allocate(method, evaluator, Target(bits, 4), scores=scores, progress=False,
                          **({"sparsities": [0.5, 0.9]} if method.startswith("classpath") else {}))
        _ALLOCATED[method, bits] = (result, evaluator.evaluations)
    return _ALLOCATED[method, bits]


@pytest.mark.parametrize("method", allocator_params(ALLOCATORS))
@pytest.mark.parametrize("bits", [2.0, 3.0])
def test_every_allocator_meets_its_budget_with_a_valid_plan(search, method, bits):
    student, data, scores = search
    target = Target(bits, 4)
    result, evaluations = allocated(search, method, bits)
    plan = result.plan
    plan.validate(student)
    average = plan.average_weight_bits(student)
    assert average <= target.max_bits + 1e-9 and average == pytest.approx(plan.meta["average_bits"], abs=1e-6)
    assert average >= bits - 1.0, "a plan far below the budget wastes it"
    assert all(layer.activation == 4 for layer in plan.layers.values())
    assert plan.meta["allocator"] == method and plan.meta["target"] == f"W{bits:g}A4"
    assert result.cost["evaluations"] == evaluations >= 1
    assert 0.0 <= result.accuracy <= 1.0 and len(result.trajectory) >= 1
    assert {"step", "phase", "action", "average_bits", "accuracy", "accepted", "evaluations"} <= set(result.trajectory.columns)


def test_evaluator_scales_equal_what_apply_sets(search):
    """The evaluator's per-(layer, bits) scale table gives exactly the scales BitPlan.apply_ computes."""
    student, data, _ = search
    evaluator = SearchEvaluator(copy.deepcopy(student), data)
    generator = torch.Generator().manual_seed(0)
    bits = torch.randint(1, 7, (evaluator.space.size,), generator=generator)
    evaluator.set_bits(bits)
    applied = copy.deepcopy(student)
    evaluator.space.to_plan(bits, 4).apply_(applied)
    for (name, a), (_, b) in zip(quantized_layers(evaluator.model), quantized_layers(applied)):
        assert torch.equal(a.weight_quantizer.bits, b.weight_quantizer.bits), name
        assert torch.equal(a.weight_quantizer.scale, b.weight_quantizer.scale), name
    x = data.val.images[:32].float() / 255
    with torch.no_grad():
        assert torch.equal(evaluator.model(x), applied(x))


def test_searches_cannot_read_the_test_split(search, digits):
    student, data, _ = search
    with pytest.raises(AllocationError, match="data.for_search"):
        SearchEvaluator(student, digits)  # a bundle that still holds the test split
    with pytest.raises(DataError, match="test split is read once"):
        data.eval_loader("test")
    with pytest.raises(DataError, match="test split is read once"):
        data.test.images
    with pytest.raises(DataError):
        data.subset("test", 10)


def test_classpath_gives_channels_on_more_paths_at_least_as_many_bits(search):
    """Hand-made scores: in each layer the first quarter of channels tops every class's list (shared),
    the rest are split so that each belongs to one class only (exclusive)."""
    student, data, _ = search
    space = ChannelSpace.of(student)
    made = {}
    owner = {}
    for name, count in zip(space.names, space.channels):
        score = torch.zeros(10, count)
        shared = count // 4
        score[:, :shared] = 1.0
        for channel in range(shared, count):
            score[channel % 10, channel] = 0.9
        made[name] = score
        owner[name] = shared
    scores = ClassScores(made, [str(c) for c in range(10)], [5] * 10, [], {})
    evaluator = SearchEvaluator(student, data)
    result = allocate("classpath_cpq", evaluator, Target(3.0, 4), scores=scores, sparsities=[0.6], progress=False)
    bits = space.split(space.from_plan(result.plan))
    for name in space.names:  # a channel holds the max over its paths: shared ones at least any exclusive one
        shared, rest = bits[name][:owner[name]], bits[name][owner[name]:]
        assert int(shared.min()) >= int(rest.max()), name
    shared_mean = float(torch.cat([b[:owner[n]] for n, b in bits.items()]).double().mean())
    rest_mean = float(torch.cat([b[owner[n]:] for n, b in bits.items()]).double().mean())
    class_bits = {c: b for c, b in result.details["class_bits"].items() if c != "(unimportant)"}
    if len(set(class_bits.values())) > 1:  # the search told classes apart: exclusive channels of low classes lose
        assert shared_mean > rest_mean, class_bits
    else:  # every class path kept the same bits (the trained model decides whether that happens)
        assert shared_mean >= rest_mean, class_bits


def test_channel_bits_is_the_max_over_paths():
    masks = torch.tensor([[1, 1, 0, 0], [1, 0, 1, 0]], dtype=torch.bool)
    assert channel_bits(masks, torch.tensor([3, 5]), 1).tolist() == [5, 3, 5, 1]


def test_pareto_knapsack_matches_brute_force():
    rng = random.Random(0)
    for _ in range(40):
        layers = [[(b * size, rng.random() / b, b) for b in range(1, 5)] for size in (rng.randint(1, 9) for _ in range(5))]
        budget = rng.uniform(5, 100)
        best = None
        for choice in itertools.product(*layers):
            cost, loss = sum(c for c, _, _ in choice), sum(l for _, l, _ in choice)
            if cost <= budget and (best is None or loss < best[0]):
                best = (loss, [b for _, _, b in choice])
        found = pareto_knapsack(layers, budget)
        if best is None:
            assert found is None
        else:
            chosen = [layer[b - 1] for layer, b in zip(layers, found)]
            assert sum(c for c, _, _ in chosen) <= budget + 1e-9
            assert sum(l for _, l, _ in chosen) == pytest.approx(best[0])


def test_class_count_borders_map_counts_to_bits():
    counts = torch.tensor([0.0, 0.4, 2.0, 5.0, 9.5], dtype=torch.float64)
    assert bits_from_borders(counts, [0.0, 0.0, 0.0, 0.0]).tolist() == [0, 4, 4, 4, 4]
    assert bits_from_borders(counts, [0.5, 2.0, 6.0, 9.0]).tolist() == [0, 0, 1, 2, 4]


def test_uniform_mixes_two_widths_layer_by_layer_up_to_the_budget(search):
    student, data, _ = search
    space = ChannelSpace.of(student)
    for target in (Target(2.5, 4, slack=0.0), Target(2.0, 4)):  # 2.0 + 0.06 slack: the slack is spent too
        result = allocate("uniform", SearchEvaluator(student, data), target, progress=False)
        per_layer = {name: set(layer.weight) for name, layer in result.plan.layers.items()}
        assert sum(len(values) > 1 for values in per_layer.values()) <= 1  # whole layers, then one layer's channels
        assert set().union(*per_layer.values()) <= {2, 3}
        average = result.plan.average_weight_bits(student)
        smallest_step = min(space.params_per_channel) / sum(c * p for c, p in zip(space.channels, space.params_per_channel))
        assert target.max_bits - smallest_step < average <= target.max_bits + 1e-12


def test_random_is_seeded(search):
    student, data, _ = search
    evaluator = SearchEvaluator(student, data)
    first = allocate("random", evaluator, Target(3.0, 4), seed=1, progress=False).plan
    again = allocate("random", evaluator, Target(3.0, 4), seed=1, progress=False).plan
    other = allocate("random", evaluator, Target(3.0, 4), seed=2, progress=False).plan
    assert first.layers == again.layers and first.layers != other.layers
    assert len({b for layer in first.layers.values() for b in layer.weight}) >= 2


@pytest.mark.parametrize("kwargs,message", [
    ({"weight_bits": 0}, "target weight bits"), ({"weight_bits": 2, "act_bits": 0}, "activation bits"),
    ({"weight_bits": 2, "act_bits": 2, "slack": -0.1}, "slack"), ({"weight_bits": True, "act_bits": 2}, "target weight bits"),
])
def test_bad_targets(kwargs, message):
    with pytest.raises(AllocationError, match=message):
        Target(**{"act_bits": None, **kwargs})


def test_allocate_errors(search, digits_baseline):
    student, data, scores = search
    evaluator = SearchEvaluator(student, data)
    with pytest.raises(AllocationError, match="unknown allocator 'greedy'.*classpath"):
        allocate("greedy", evaluator, Target(2, 4))
    for method in ("classpath", "class_count"):
        with pytest.raises(AllocationError, match="needs class scores"):
            allocate(method, evaluator, Target(2, 4))
    with pytest.raises(AllocationError, match="similarity: 'cosine' is not allowed"):
        allocate("classpath", evaluator, Target(2, 4), scores=scores, similarity="cosine", progress=False)
    with pytest.raises(AllocationError, match="min_bits 5.*must not exceed the start bits 4"):
        allocate("classpath", evaluator, Target(2, 4), scores=scores, min_bits=5, progress=False)
    with pytest.raises(AllocationError, match="unknown classpath preset 'paper'"):
        allocate("classpath", evaluator, Target(2, 4), scores=scores, preset="paper", progress=False)
    with pytest.raises(AllocationError, match=r"unknown classpath knob\(s\) \['alpha'\]"):
        allocate("classpath", evaluator, Target(2, 4), scores=scores, alpha=1, progress=False)
    other = ClassScores({"nope": torch.ones(10, 3)}, [str(c) for c in range(10)], [1] * 10, [], {})
    with pytest.raises(AllocationError, match="no entry for quantized layer"):
        allocate("class_count", evaluator, Target(2, 4), scores=other, progress=False)
    block = quantize_(copy.deepcopy(digits_baseline[0]), QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(2, 2)))
    with pytest.raises(AllocationError, match="per-channel symmetric"):
        SearchEvaluator(block, data)


def test_markdown_comparison_gives_cis_paired_contrasts_and_flags_unequal_budgets():
    import pandas as pd

    from cpq_lib.allocation.report import markdown_comparison

    def row(target, allocator, seed, test, bits=2.05):
        return {"run": f"{allocator}-{target}-{seed}", "target": target, "allocator": allocator, "seed": seed,
                "test_after": test, "test_before": 0.1, "val_after": test, "average_bits": bits, "bitops": 1e9,
                "evaluations": 3, "search_seconds": 1.0}
    frame = pd.DataFrame([row("W3A3", "uniform", 0, 0.90, 3.05), row("W3A3", "classpath", 0, 0.91, 3.0),
                          row("W2A2", "classpath", 0, 0.80), row("W2A2", "classpath", 1, 0.82),
                          row("W2A2", "sensitivity", 0, 0.83), row("W2A2", "sensitivity", 1, 0.84),
                          row("W2A2", "uniform", 0, 0.70)])
    text = markdown_comparison(frame)
    lines = [line for line in text.splitlines() if line.startswith("| W") and "−" not in line]
    # targets in thesis order, allocators by mean test accuracy within a target
    assert [line.split(" | ")[:2] for line in lines] == [["| W2A2", "sensitivity"], ["| W2A2", "classpath"],
                                                          ["| W2A2", "uniform"], ["| W3A3", "classpath"],
                                                          ["| W3A3", "uniform"]]
    # mean ± the 95% t half-width over two seeds: t(0.975, 1) * std / sqrt(2) = 12.706 * 1.414 / 1.414 points
    assert "| 2 | 81.00 ± 12.71 |" in lines[1]
    assert "| 3.000 † |" in lines[3] and "†" not in lines[4] and "not an equal budget" in text  # 0.05 bits under the point's highest
    contrasts = [line for line in text.splitlines() if "−" in line and line.startswith("| W")]
    # classpath − sensitivity at W2A2, paired by seed: (-3, -2) points -> mean -2.5, CI -2.5 ± 12.706 * 0.707 / 1.414
    assert "| W2A2 | classpath − sensitivity | 2 | -2.50 | [-8.85, +3.85] | – |" in contrasts
    assert "| W2A2 | classpath − uniform | 1 | +10.00 | – | – |" in contrasts
    assert "best other" not in text


def test_the_hessian_arms_are_contrasted_with_uniform_classpath_and_their_class_ablation():
    import pandas as pd

    from cpq_lib.allocation.report import contrast_table

    tests = {"uniform": (0.80, 0.82), "classpath": (0.79, 0.80), "hawq": (0.83, 0.84),
             "hawq_channel": (0.81, 0.81), "hawq_class": (0.84, 0.86)}
    frame = pd.DataFrame([{"run": f"{arm}-{seed}", "target": "W2A2", "allocator": arm, "seed": seed, "test_after": value}
                          for arm, values in tests.items() for seed, value in enumerate(values)])
    table = contrast_table(frame).set_index(["arm", "baseline"])
    # the ones whose arms ran, none of those whose arms did not (sensitivity, random paths, aimet)
    assert set(table.index) == {("classpath", "uniform"), ("hawq", "uniform"), ("hawq", "classpath"),
                                ("hawq_channel", "uniform"), ("hawq_channel", "classpath"), ("hawq_class", "uniform"),
                                ("hawq_class", "classpath"), ("hawq_class", "hawq_channel")}
    # paired by seed: (0.84 - 0.81, 0.86 - 0.81) -> +0.04; (0.84 - 0.79, 0.86 - 0.80) -> +0.055
    assert table.loc[("hawq_class", "hawq_channel"), "difference"] == pytest.approx(0.04)
    assert table.loc[("hawq_class", "classpath"), "difference"] == pytest.approx(0.055)
    assert (table["pairs"] == 2).all()


def test_contrasts_add_mcnemar_per_seed_from_the_records():
    import numpy as np
    import pandas as pd

    from cpq_lib.allocation.report import contrast_table
    from cpq_lib.statistics import mcnemar, pack_correct

    rng = np.random.default_rng(0)
    base = rng.random(1000) < 0.8
    better = base | (rng.random(1000) < 0.5)  # right wherever the baseline is, and on about half the rest
    frame = pd.DataFrame([{"run": "a", "target": "W2A2", "allocator": "classpath", "seed": 0, "test_after": better.mean()},
                          {"run": "b", "target": "W2A2", "allocator": "uniform", "seed": 0, "test_after": base.mean()}])
    records = {run: {"results": {"after_refinement": {"test_correct": pack_correct(flags)}}}
               for run, flags in (("a", better), ("b", base))}
    table = contrast_table(frame, records)
    (p,) = table.loc[table["baseline"] == "uniform", "mcnemar_p"].iloc[0]
    assert p == pytest.approx(mcnemar(better, base).p_value) and p < 1e-20


def test_reading_views_put_accuracies_and_differences_in_points():
    import pandas as pd

    from cpq_lib.allocation.report import contrast_view, percent_view

    table = pd.DataFrame([{"mean": 0.8412, "ci_low": 0.8302, "ci_high": 0.8522, "bitops": 8.94e8}])
    view = percent_view(table).iloc[0]
    assert (view["test (%)"], view["± (95% CI)"], view["GBitOPs"]) == pytest.approx((84.12, 1.10, 0.894))
    contrasts = pd.DataFrame([{"difference": -0.0011, "ci_low": -0.0079, "ci_high": 0.0057, "mcnemar_p": [0.5, 0.0312]}])
    row = contrast_view(contrasts).iloc[0]
    assert (row["difference"], row["ci_low"], row["ci_high"]) == pytest.approx((-0.11, -0.79, 0.57))
    assert row["mcnemar_p"] == "0.50, 0.03"


def test_comparison_command_prints_the_table_of_a_csv(tmp_path, capsys):
    import pandas as pd

    from cpq_lib.allocation.report import main

    pd.DataFrame([{"target": "W2A2", "allocator": "uniform", "seed": 0, "test_after": 0.5, "test_before": 0.1,
                   "val_after": 0.5, "average_bits": 2.0, "bitops": 2e9, "evaluations": 1,
                   "search_seconds": 4.0}]).to_csv(tmp_path / "results.csv", index=False)
    assert main([str(tmp_path / "results.csv")]) == 0
    assert "| W2A2 | uniform | 1 | 50.00 | 10.00 | 50.00 | 2.000 | 2.000 | 1 | 4 |" in capsys.readouterr().out


def test_comparison_command_names_what_is_wrong_with_its_file(tmp_path, capsys):
    import pandas as pd

    from cpq_lib.allocation.report import main
    from cpq_lib.experiment import TIDY_COLUMNS

    good = {"target": "W2A2", "allocator": "uniform", "seed": 0, "test_after": 0.5, "test_before": 0.1, "val_after": 0.5,
            "average_bits": 2.0, "bitops": 2e9, "evaluations": 1, "search_seconds": 4.0}
    cases = {"missing.csv": (None, "no such file"), "empty.csv": ("", "is empty: the sweep finished no run"),
             "one-byte.csv": ("\n", "is empty: the sweep finished no run"),
             "columns.csv": ("a,b\n1,2\n", "lacks the columns ['target'"),
             "text.csv": (pd.DataFrame([{**good, "test_after": "high"}]).to_csv(index=False),
                          "column 'test_after' holds non-numeric values, e.g. 'high' (row 2)"),
             "no-runs.csv": (",".join(["run", *TIDY_COLUMNS]) + "\n", "has no runs")}
    for name, (content, message) in cases.items():
        if content is not None:
            (tmp_path / name).write_text(content)
        assert main([str(tmp_path / name)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and str(tmp_path / name) in err and message in err, (name, err)
    assert main([str(tmp_path)]) == 2 and "is a folder" in capsys.readouterr().err
    (tmp_path / "binary.csv").write_bytes(b"\xff\xfe\x00\x01")
    assert main([str(tmp_path / "binary.csv")]) == 2 and "error: " in capsys.readouterr().err


SPENDS_THE_BUDGET = ("uniform", "random", "sensitivity", "hawq", "hawq_channel", "hawq_class", "aimet")  # class-level steps (class paths, class count) land where they land


@pytest.mark.parametrize("bits", [2.0, 3.0])
def test_allocators_that_spend_the_budget_land_within_0_01_of_its_maximum(search, bits):
    import pandas as pd

    from cpq_lib.allocation.report import markdown_comparison

    student, data, scores = search
    target = Target(bits, 4)
    rows = []
    for method in installed_allocators(ALLOCATORS):
        result, _ = allocated(search, method, bits)
        average = result.plan.average_weight_bits(student)
        if method in SPENDS_THE_BUDGET:
            assert target.max_bits - 0.01 - 1e-9 <= average <= target.max_bits + 1e-9, (method, average)
        rows.append({"target": target.label(), "allocator": method, "seed": 0, "test_after": 0.5, "test_before": 0.5,
                     "val_after": 0.5, "average_bits": average, "bitops": 1.0, "evaluations": 1, "search_seconds": 1.0})
    text = markdown_comparison(pd.DataFrame(rows))
    highest = max(r["average_bits"] for r in rows)
    for row in rows:  # the table flags every arm that spent more than 0.01 bits less than the highest
        line = next(line for line in text.splitlines() if line.startswith(f"| {target.label()} | {row['allocator']} |"))
        assert ("†" in line) == (highest - row["average_bits"] > 0.01 + 1e-12), line


def test_the_bitops_and_size_models_are_the_layer_tables(search):
    from cpq_lib.allocation.budgets import bitops_model, size_model
    from cpq_lib.quant import model_summary

    student, data, _ = search
    evaluator = SearchEvaluator(copy.deepcopy(student), data, bn_images=64)
    example = next(iter(evaluator.batches))[0][:1]
    for bits in (evaluator.space.uniform(3), torch.randint(1, 7, (evaluator.space.size,), generator=torch.Generator().manual_seed(1))):
        applied = copy.deepcopy(student)
        evaluator.space.to_plan(bits, 4).apply_(applied)
        summary = model_summary(applied, example)
        assert bitops_model(evaluator).gbitops(bits) * 1e9 == pytest.approx(summary["bitops"], rel=1e-9)
        assert size_model(evaluator).bytes(bits) == pytest.approx(summary["size_bytes"], rel=1e-12)


@pytest.mark.parametrize("method", allocator_params(ALLOCATORS))
def test_every_allocator_honours_a_bitops_budget(search, method):
    from cpq_lib.allocation.budgets import bitops_model

    student, data, scores = search
    evaluator = SearchEvaluator(copy.deepcopy(student), data, bn_images=64)
    model = bitops_model(evaluator)
    # binding: the quantized layers at 80% of their BitOPs at 3 bits everywhere (the float layers' share is fixed),
    # with room in the average bits
    limit = (model.constant + 0.8 * (model.gbitops(evaluator.space.uniform(3)) * 1e9 - model.constant)) / 1e9
    result = allocate(method, evaluator, Target(3.0, 4, max_gbitops=limit), scores=scores, progress=False,
                      **({"sparsities": [0.5]} if method.startswith("classpath") else {}))
    spent = model.gbitops(evaluator.space.from_plan(result.plan))
    assert spent <= limit and result.plan.meta["gbitops"] == pytest.approx(spent)
    assert result.plan.meta["average_bits"] <= 3.06
    if method in SPENDS_THE_BUDGET:
        assert spent >= 0.95 * limit  # the binding budget is (nearly) spent


@pytest.mark.parametrize("method", ["uniform", "random", "sensitivity", "hawq_channel", "classpath"])
def test_allocators_honour_a_size_budget(search, method):
    from cpq_lib.allocation.budgets import size_model

    student, data, scores = search
    evaluator = SearchEvaluator(copy.deepcopy(student), data, bn_images=64)
    model = size_model(evaluator)
    limit = model.constant + 0.85 * (model.bytes(evaluator.space.uniform(3)) - model.constant)
    result = allocate(method, evaluator, Target(3.0, 4, max_bytes=limit), scores=scores, progress=False,
                      **({"sparsities": [0.5]} if method.startswith("classpath") else {}))
    spent = model.bytes(evaluator.space.from_plan(result.plan))
    assert spent <= limit and result.plan.meta["bytes"] == pytest.approx(spent, abs=1e-3)
    if method in SPENDS_THE_BUDGET:
        assert spent >= 0.95 * limit
    with pytest.raises(AllocationError, match="max_bytes must be a positive number"):
        Target(3.0, 4, max_bytes=-1)
    with pytest.raises(AllocationError, match="max_gbitops must be a positive number"):
        Target(3.0, 4, max_gbitops=0)


def test_hawq_arms_share_their_hessian_traces_through_a_keyed_cache(search, tmp_path, monkeypatch):
    """hawq and hawq_channel estimate the same traces: with a cache folder the second reads them, and its
    plan is the one it makes without the cache; other settings, the per-class traces or a damaged
    entry are computed again, never served."""
    import cpq_lib.allocation.hawq as hawq_module

    student, data, scores = search
    target = Target(2.0, 4)

    def run(method, images=64, **knobs):
        return allocate(method, SearchEvaluator(student, data, bn_images=images), target, progress=False,
                        trace_cache=tmp_path, **knobs)

    uncached = {method: allocated(search, method, 2.0)[0] for method in ("hawq", "hawq_channel")}
    first = run("hawq")
    assert first.details["trace_cost"]["from_cache"] is False
    assert first.details["traces"] == uncached["hawq"].details["traces"]
    (entry,) = tmp_path.glob("traces-*.pt")

    class Recomputed(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Recomputed

    real = hawq_module.hutchinson_traces
    monkeypatch.setattr(hawq_module, "hutchinson_traces", refuse)
    second = run("hawq_channel")
    assert second.details["trace_cost"]["from_cache"] is True
    assert second.details["traces"] == first.details["traces"]
    assert second.details["trace_cost"]["seconds"] == first.details["trace_cost"]["seconds"]  # what computing them took
    space = SearchEvaluator(student, data, bn_images=64).space
    assert torch.equal(space.from_plan(second.plan), space.from_plan(uncached["hawq_channel"].plan))
    for method, knobs in (("hawq", {"seed": 1}), ("hawq", {"max_probes": 150}), ("hawq", {"images": 32}), ("hawq_class", {})):
        with pytest.raises(Recomputed):
            run(method, **knobs)
    entry.write_bytes(b"damaged")
    monkeypatch.setattr(hawq_module, "hutchinson_traces", real)
    again = run("hawq")
    assert again.details["trace_cost"]["from_cache"] is False and again.details["traces"] == first.details["traces"]
    assert [p.name for p in tmp_path.glob("traces-*.pt")] == [entry.name] and entry.stat().st_size > 100


@pytest.mark.parametrize("method", allocator_params(["hawq", "hawq_class", "aimet"]))
def test_search_seconds_count_the_work_before_the_single_evaluation(search, method):
    """Traces (hawq) and AIMET's own phases are part of the search's cost, not only the one evaluation."""
    result, _ = allocated(search, method, 2.0)
    cost = result.cost
    if method.startswith("hawq"):
        assert cost["search_seconds"] >= result.details["trace_cost"]["seconds"] > 0
    else:
        assert cost["search_seconds"] > 10 * cost["evaluation_seconds"]
    assert cost["evaluations"] == 1
