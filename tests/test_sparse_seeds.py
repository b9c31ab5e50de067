"""The compression pipeline read over seeds: intervals, contrasts paired by seed, runs that may not be mixed."""

from __future__ import annotations

import math

import pandas as pd
import pytest

from cpq_lib.sparse.seeds import accuracy_over_seeds, contrasts_over_seeds, ratios_over_seeds, stages_over_seeds
from cpq_lib.statistics import mean_interval

METHODS = ("float", "focused", "deep compression", "pruned only")


def _result(seed: int, accuracy: dict[str, float], ratios: dict[str, float], bits: int = 5) -> dict:
    sizes = pd.DataFrame([{"coder": coder, "layer": "total", "bits": 1000.0 / ratio, "ratio": ratio * (1.01 if coder == "zstd" else 1.0),
                           "coded_layers_ratio": 2 * ratio, "method": method}
                          for method, ratio in ratios.items() for coder in ("ans", "zstd")]
                         + [{"coder": "ans", "layer": "layer1", "bits": 1.0, "ratio": math.nan, "method": "focused"}])
    stages = pd.DataFrame({"stage": ["float", "pruned 1/1", "focused 1", "deep compression 5-bit"], "sparsity": [0.0, 0.8, 0.8, 0.8],
                           "val_accuracy": [0.9, 0.88 + seed / 100, 0.87, 0.86]})
    return {"config": {"bits": bits, "sparsity": 0.8, "seed": seed}, "train": {"lr": 0.01}, "test_accuracy": accuracy,
            "sizes": sizes, "stages": stages}


def _study() -> list[dict]:
    """Seed shifts shared by all arms (they must cancel in the contrasts), focused 1, 2, 3 points over DC."""
    results = []
    for seed, shift in ((0, 0.0), (1, 0.02), (2, -0.01)):
        dc = 0.85 + shift
        results.append(_result(seed, {"float": 0.89, "focused": dc + 0.01 * (seed + 1), "deep compression": dc,
                                      "pruned only": dc + 0.005}, {"focused": 15.0 + seed, "deep compression": 14.0}))
    return results


def test_accuracy_and_ratios_are_means_with_student_t_intervals():
    accuracy = accuracy_over_seeds(_study()).set_index("method")
    expected = mean_interval([86.0, 89.0, 87.0])  # focused per seed, in points
    row = accuracy.loc["focused"]
    assert row["seeds"] == 3 and row["mean"] == pytest.approx(expected.mean) and row["ci_low"] == pytest.approx(expected.low)
    assert row["per_seed"] == "86.00 / 89.00 / 87.00"
    assert accuracy.loc["float", "ci_low"] == pytest.approx(89.0) and list(accuracy.index) == list(METHODS)
    ratios = ratios_over_seeds(_study()).set_index(["method", "coder"])
    focused = ratios.loc[("focused", "ans")]
    assert focused["ratio_mean"] == pytest.approx(16.0) and focused["coded_layers_ratio_mean"] == pytest.approx(32.0)
    assert focused["ratio_ci_high"] == pytest.approx(mean_interval([15.0, 16.0, 17.0]).high)
    assert ratios.loc[("focused", "zstd"), "ratio_mean"] == pytest.approx(16.16)  # per coder, not pooled
    assert ratios.loc[("deep compression", "ans"), "ratio_ci_low"] == pytest.approx(14.0)  # equal values: a zero-width interval


def test_contrasts_pair_by_seed_and_leave_out_ratios_of_uncoded_arms():
    contrasts = contrasts_over_seeds(_study()).set_index(["arm", "baseline"])
    versus_dc = contrasts.loc[("focused", "deep compression")]
    expected = mean_interval([1.0, 2.0, 3.0])  # the shared seed shifts (0, +2, -1 points) cancel
    assert versus_dc["accuracy_mean"] == pytest.approx(expected.mean) and versus_dc["accuracy_ci_low"] == pytest.approx(expected.low)
    assert versus_dc["ratio_mean"] == pytest.approx(2.0) and versus_dc["ahead"] == 3 and versus_dc["pairs"] == 3
    control = contrasts.loc[("deep compression", "pruned only")]
    assert control["accuracy_mean"] == pytest.approx(-0.5) and control["ahead"] == 0
    assert math.isnan(control["ratio_mean"])  # the pruned-only control is not coded: no ratio contrast
    assert list(contrasts.index) == [("focused", "deep compression"), ("focused", "pruned only"), ("deep compression", "pruned only")]


def test_stages_are_averaged_in_pipeline_order():
    stages = stages_over_seeds(_study())
    assert stages["stage"].tolist() == ["float", "pruned 1/1", "focused 1", "deep compression 5-bit"]
    assert stages.set_index("stage").loc["pruned 1/1", "val_accuracy"] == pytest.approx(0.89)  # 0.88, 0.89, 0.90
    assert (stages["seeds"] == 3).all()


def test_runs_that_differ_in_more_than_the_seed_are_refused():
    study = _study()
    other = _result(3, study[0]["test_accuracy"], {"focused": 15.0}, bits=4)
    with pytest.raises(ValueError, match=r"results 0 and 3 differ in config \['bits'\]: only the seed may differ"):
        accuracy_over_seeds([*study, other])
    trained_longer = {**_result(3, study[0]["test_accuracy"], {"focused": 15.0}), "train": {"lr": 0.1}}
    with pytest.raises(ValueError, match=r"differ in train \['lr'\]"):
        contrasts_over_seeds([study[0], trained_longer])
    with pytest.raises(ValueError, match=r"repeat a seed \(\[0, 1, 2, 0\]\)"):
        ratios_over_seeds([*study, study[0]])
    with pytest.raises(ValueError, match="at least one"):
        stages_over_seeds([])
