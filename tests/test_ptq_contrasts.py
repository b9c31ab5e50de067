"""PTQ-SL over calibration seeds: paired contrasts, equal-scale layouts, a layout chosen on validation, test read once."""

from __future__ import annotations

import pandas as pd
import pytest

from cpq_lib.ptq import ScaleSearchConfig
from cpq_lib.ptq.contrasts import choose_layouts, evaluate_chosen, reordering_contrasts, study_over_seeds
from cpq_lib.statistics import mean_interval
from cpq_lib.ptq.study import LAYOUTS


def _table() -> pd.DataFrame:
    rows = []
    for seed, shift in ((0, 0.0), (1, 0.01), (2, -0.01)):
        for layout, reorder, scales, acc in (("channel", "none", 100, 0.80), ("8x1", "none", 16, 0.70), ("8x1", "permute", 16, 0.74),
                                             ("16x2", "none", 64, 0.78), ("16x2", "permute", 64, 0.79), ("16x4", "permute", 128, 0.9)):
            bump = 0.01 * seed if reorder == "permute" and layout == "8x1" else 0.0
            rows.append({"target": "W4A4", "search": False, "granularity": layout, "reorder": reorder, "scales": scales,
                         "seed": seed, "val_accuracy": acc + shift + bump, "metadata_bits": 32 * scales})
    return pd.DataFrame(rows)


def test_contrasts_pair_by_seed_and_the_choice_respects_the_scale_limit():
    contrasts = reordering_contrasts(_table()).set_index(["granularity", "reorder"])
    eight = contrasts.loc[("8x1", "permute")]
    expected = mean_interval([4.0, 5.0, 6.0])  # 0.04 + 0.01 * seed, in points, the seed shift cancels
    assert eight["difference"] == pytest.approx(expected.mean) and eight["ci_low"] == pytest.approx(expected.low) and eight["seeds"] == 3
    assert contrasts.loc[("16x2", "permute"), "difference"] == pytest.approx(1.0)
    assert ("16x4", "permute") not in contrasts.index  # no plain row to pair with
    chosen = choose_layouts(_table()).iloc[0]
    assert chosen["chosen"] == "16x2" and chosen["channel_scales"] == 100  # 16x4 has more scales than channel-wise
    assert chosen["chosen_selection_accuracy"] == pytest.approx(79.0)


def test_seeded_study_equal_scale_layout_and_a_rebuilt_choice(digits_baseline, digits):
    model, _ = digits_baseline
    layouts = {name: LAYOUTS[name] for name in ("layer", "C/2x2", "channel")}
    results = study_over_seeds(model, digits, ["W4A4"], lambda seed: list(digits.calibration_loader(64, seed=seed)), [0, 1],
                               search=ScaleSearchConfig(steps=5, rounds=1, positions=128), granularities=layouts,
                               reorders=("none", "permute"), searches=(False,), progress=False)
    assert sorted(set(results["seed"])) == [0, 1] and len(results) == 2 * 4
    scales = results.drop_duplicates("granularity").set_index("granularity")["scales"]
    assert scales["C/2x2"] == scales["channel"]  # channel-wise's scale count, in every layer
    assert results.loc[results["granularity"] == "C/2x2", "map_bits"].eq(0).all()  # permuted: no maps
    contrasts = reordering_contrasts(results)
    assert list(contrasts["granularity"]) == ["C/2x2"] and contrasts["seeds"].iloc[0] == 2
    chosen = choose_layouts(results)
    assert list(chosen["chosen"]) == ["C/2x2"]
    # rebuilt from its settings, a chosen configuration reproduces the study's own accuracy (here on validation)
    again = evaluate_chosen(model, digits, chosen, lambda seed: list(digits.calibration_loader(64, seed=seed)), [0, 1],
                            ScaleSearchConfig(steps=5, rounds=1, positions=128), split="val").iloc[0]
    study = results[(results["granularity"] == "C/2x2") & (results["reorder"] == "permute")]["val_accuracy"].mean()
    channel = results[results["granularity"] == "channel"]["val_accuracy"].mean()
    assert again["chosen_val"] == pytest.approx(100 * study) and again["channel_val"] == pytest.approx(100 * channel)
    with pytest.raises(ValueError, match="seeds: give at least one"):
        study_over_seeds(model, digits, ["W4A4"], lambda seed: [], [])


def test_command_line_over_seeds_reads_the_test_split_for_the_chosen_layouts_only(tmp_path, quick_baseline_dir, capsys):
    import shutil

    from cpq_lib.ptq.__main__ import main

    run = tmp_path / "run"
    shutil.copytree(quick_baseline_dir, run / "baseline")
    out = tmp_path / "out" / "ptqsl.csv"
    argv = ["--profile", "quick", "--out", str(out), "--run-dir", str(run), "--targets", "W4A4", "--granularities",
            "C/2x2", "channel", "--reorders", "none", "permute", "--calibration-images", "32", "--rounds", "1",
            "--positions", "64", "--seeds", "0", "1"]
    assert main([*argv, "--test-chosen"]) == 0
    results = pd.read_csv(out)
    assert sorted(set(results["seed"])) == [0, 1] and "test_accuracy" not in results.columns
    assert (out.parent / "ptqsl-s0.csv").is_file() and (out.parent / "ptqsl-s1.csv").is_file()
    contrasts = pd.read_csv(out.parent / "ptqsl-contrasts.csv")
    assert set(contrasts["granularity"]) == {"C/2x2"} and (contrasts["seeds"] == 2).all()
    tested = pd.read_csv(out.parent / "ptqsl-test.csv")
    assert len(tested) == 2 and set(tested["search"]) == {False, True} and tested["chosen_test"].between(0, 100).all()
    assert main([*argv[:-3], "--test-chosen"]) == 2 and "--test-chosen needs --seeds" in capsys.readouterr().err
    assert main([*argv, "--splits", "val", "test"]) == 2 and "leave test out of --splits" in capsys.readouterr().err


def test_mean_over_seeds_gives_one_row_per_configuration():
    from cpq_lib.ptq import mean_over_seeds

    table = _table().assign(search_seconds=lambda f: 1.0 + f["seed"])
    means = mean_over_seeds(table)
    assert len(means) == len(table) // 3 and (means["seeds"] == 3).all() and "seed" not in means.columns
    row = means.set_index(["granularity", "reorder"]).loc[("8x1", "permute")]
    assert row["val_accuracy"] == pytest.approx(0.74 + 0.01) and row["search_seconds"] == pytest.approx(2.0)  # (0 + 1 - 1)/3 + 0.01
    assert row["metadata_bits"] == 32 * 16 and row["scales"] == 16
    assert mean_over_seeds(table.drop(columns="seed")).equals(table.drop(columns="seed"))  # one study: as it is


def test_report_of_a_study_over_seeds_shows_means_intervals_and_the_test_reading(tmp_path, capsys):
    from cpq_lib.ptq.__main__ import main

    table = _table()
    stem = tmp_path / "study"
    table.to_csv(f"{stem}.csv", index=False)
    assert main(["--report", f"{stem}.csv"]) == 0  # without the sibling files: contrasts computed, no test table
    text = capsys.readouterr().out
    assert "Mean over calibration seeds [0, 1, 2]:" in text
    assert "| W4A4 | permute | 75.00 | 79.00 |  | 90.00 |" in text  # means over seeds (8x1: 0.74 + 0.01 on average)
    assert "| W4A4 | no | permute | +5.00 [+2.52, +7.48] | +1.00 [+1.00, +1.00] |" in text  # 8x1 then 16x2, paired by seed
    assert "test split read once" not in text
    tested = pd.DataFrame([{"target": "W4A4", "search": False, "reorder": "permute", "chosen": "16x2", "chosen_scales": 64,
                            "channel_test": 80.0, "chosen_test": 80.5, "difference": 0.5, "ci_low": -0.25, "ci_high": 1.25, "seeds": 3}])
    tested.to_csv(f"{stem}-test.csv", index=False)
    assert main(["--report", f"{stem}.csv"]) == 0
    text = capsys.readouterr().out
    assert "| W4A4 | no | permute | 16x2 (64) | 80.00 | 80.50 | +0.50 [-0.25, +1.25] |" in text
