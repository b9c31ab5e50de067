"""The compression pipeline end to end on the quick model: stages, sizes, and a resume that changes nothing."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from cpq_lib.config import TrainConfig
from cpq_lib.sparse.pipeline import CompressionConfig, compress_model

TRAIN = TrainConfig(epochs=1, lr=0.01, schedule="cosine", batch_size=64)


def _summary(result):
    sizes = result["sizes"]
    totals = sizes[sizes["layer"] == "total"].set_index(["method", "coder"])["bits"].to_dict()
    return result["stages"]["val_accuracy"].tolist(), totals, result["test_accuracy"]


def test_pipeline_stages_sizes_and_exact_resume(digits_baseline, digits, tmp_path):
    model, _ = digits_baseline
    config = CompressionConfig(sparsity=0.7, prune_steps=2, bits=4, baseline_bits=4, fractions=(0.5, 1.0))
    first = compress_model(model, digits, config, TRAIN, tmp_path / "a", progress=False)
    stages = first["stages"]
    assert stages["stage"].tolist() == ["float", "pruned 1/2", "pruned 2/2", "focused 0.5", "focused 1",
                                         "deep compression 4-bit", "pruned only, +2 epochs",
                                         "deep compression 4-bit, fp16 codebooks"]
    sizes = first["sizes"]
    assert set(sizes["method"]) == {"focused", "deep compression", "deep compression fp16 codebooks"}
    assert set(sizes["coder"]) == {"huffman", "ans", "zstd"}
    totals = sizes[sizes["layer"] == "total"].set_index(["method", "coder"])
    assert (totals["ratio"] > 1).all() and (totals["coded_layers_ratio"] > totals["ratio"]).all()  # fp32 remainder left out
    layers = sizes[(sizes["layer"] != "total") & (sizes["coder"] == "ans")]
    coded = layers.groupby("method")["bits"].sum()
    assert totals.loc[("focused", "ans"), "coded_layers_ratio"] == pytest.approx(32 * layers[layers["method"] == "focused"]["weights"].sum() / coded["focused"])
    header = layers.groupby("method")["header_bits"].sum()  # 16 instead of 32 bits per centroid, 16 centroids per layer
    assert header["deep compression"] - header["deep compression fp16 codebooks"] == 16 * 16 * len(first["layers"])
    assert set(first["test_accuracy"]) == {"float", "focused", "deep compression", "pruned only", "deep compression fp16 codebooks"}
    control = first["models"]["pruned only"]
    for name in first["layers"]["layer"]:  # the control is the pruned model trained on: the same zeros, other weights
        assert torch.equal(control.get_submodule(name).weight == 0, first["models"]["focused"].get_submodule(name).weight == 0)
    focused = first["models"]["focused"]
    for name in first["layers"]["layer"]:
        weight = focused.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
        quantizer = focused.get_submodule(name).parametrizations.weight[0].weight_quantizer
        assert int(quantizer.refits) == 1 and quantizer.levels == "paper"  # re-estimated before the second step
    assert (first["layers"]["levels"] == "paper").all() and first["layers"]["zero_level"].all()
    assert first["layers"]["input_bits"].isna().all()  # float activations unless hardware=True
    # a run killed after the first focused stage resumes to the same result
    for stale in ["focused-2.pt", "focused-2.state", "baseline.pt", "baseline.state", "pruned-only.pt", "pruned-only.state"]:
        (tmp_path / "a" / stale).unlink()
    assert _summary(compress_model(model, digits, config, TRAIN, tmp_path / "a", progress=False)) == _summary(first)


def test_a_run_with_other_settings_recomputes_instead_of_loading_stages(digits_baseline, digits, tmp_path):
    """Stage files used to be keyed by their index only: a second run in the same folder loaded the first
    run's models and reported their sizes and accuracies under its own settings."""
    model, _ = digits_baseline
    first = CompressionConfig(sparsity=0.8, prune_steps=1, bits=6, baseline_bits=6, fractions=(1.0,))
    second = CompressionConfig(sparsity=0.5, prune_steps=1, bits=3, baseline_bits=3, fractions=(1.0,))
    compress_model(model, digits, first, TRAIN, tmp_path / "shared", progress=False)
    reused = compress_model(model, digits, second, TRAIN, tmp_path / "shared", progress=False)
    fresh = compress_model(model, digits, second, TRAIN, tmp_path / "fresh", progress=False)
    assert _summary(reused) == _summary(fresh)
    weight = reused["models"]["focused"].get_submodule(reused["layers"]["layer"][0]).weight
    assert float((weight == 0).float().mean()) == pytest.approx(0.5, abs=0.01)
    # a later stage's change keeps the earlier stages: only the baseline is trained again
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "shared").glob("*.pt")}
    third = compress_model(model, digits, dataclasses.replace(second, baseline_bits=2), TRAIN, tmp_path / "shared", progress=False)
    changed = {p.name for p in (tmp_path / "shared").glob("*.pt") if p.stat().st_mtime_ns != stamps[p.name]}
    assert changed == {"baseline.pt"}
    # the Deep Compression rows (the baseline at baseline_bits, and its fp16-codebook row) are the ones that change
    kept = ~fresh["stages"]["stage"].str.startswith("deep compression").to_numpy()
    assert kept.sum() >= 4 and (~kept).sum() == 2
    assert third["stages"]["val_accuracy"][kept].tolist() == fresh["stages"]["val_accuracy"][kept].tolist()
    assert all("2-bit" in name for name in third["stages"]["stage"][~kept])
    # another float model (here: other weights) starts over
    other = copy.deepcopy(model)
    with torch.no_grad():
        next(other.parameters()).mul_(0.5)
    compress_model(other, digits, second, TRAIN, tmp_path / "shared", progress=False)
    assert all(p.stat().st_mtime_ns != stamps[p.name] for p in (tmp_path / "shared").glob("*.pt"))


@pytest.mark.parametrize("argv,message", [
    (["--lr", "-1"], "--lr: -1 is not allowed; give a finite number > 0"), (["--lr", "nan"], "--lr: nan is not allowed"),
    (["--bits", "17"], "--bits: 17 is not allowed; give an integer from 2 to 8"), (["--baseline-bits", "0"], "--baseline-bits"),
    (["--prune-steps", "0"], "--prune-steps: 0 is not allowed"), (["--scope", "row"], "--scope: invalid choice"),
])
def test_command_line_refuses_bad_arguments_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    from cpq_lib.sparse import __main__ as cli

    monkeypatch.setattr(cli, "load_data", lambda config: pytest.fail("data loaded before the arguments were checked"))
    with pytest.raises(SystemExit) as exited:
        cli.main(["--out", str(tmp_path / "out"), *argv])
    assert exited.value.code == 2 and message in capsys.readouterr().err
    (tmp_path / "afile").write_text("x")
    for bad in (["--out", str(tmp_path / "afile")], ["--out", str(tmp_path / "o"), "--run-dir", str(tmp_path / "afile" / "r")],
                ["--out", str(tmp_path / "o"), "--sparsity", "1.5"]):
        assert cli.main(bad) == 2 and capsys.readouterr().err.startswith("error: ")
    assert not (tmp_path / "out").exists() and not (tmp_path / "o").exists()


@pytest.mark.parametrize("kwargs,message", [
    ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"), ({"bits": 1}, "bits must be an integer from 2"),
    ({"bits": 17}, "bits must be an integer from 2 .* to 8, got 17"), ({"baseline_bits": 9}, "baseline_bits must be an integer from 1 to 8"),
    ({"fractions": (0.5, 0.25, 1.0)}, "fractions must rise"), ({"fractions": (0.5,)}, "end at 1"),
    ({"scope": "row"}, "scope 'row'"), ({"prune_steps": 0}, "prune_steps must be a positive integer"),
])
def test_bad_configuration_is_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CompressionConfig(**kwargs)


def test_command_line_saves_and_loads_results(tmp_path, quick_baseline_dir):
    import shutil

    from cpq_lib.sparse.__main__ import main
    from cpq_lib.sparse.pipeline import load_results

    run = tmp_path / "runs"
    shutil.copytree(quick_baseline_dir, run / "baseline")
    out = tmp_path / "out"
    code = main(["--out", str(out), "--run-dir", str(run / "focused"), "--sparsity", "0.6", "--prune-steps", "1",
                 "--fractions", "1.0", "--bits", "4", "--baseline-bits", "3", "--levels", "log2", "--assignment", "sample",
                 "--hardware", "--no-refit", "--layer-sparsity", "features.0.*=0.3"])
    assert code == 0
    loaded = load_results(out)
    nonzero = loaded["layers"].set_index("layer")["nonzero"]
    assert nonzero["features.0.0"] == round(0.7 * 32 * 16 * 9) and nonzero["features.2.0"] == round(0.4 * 64 * 32 * 9)
    assert {k: loaded["config"][k] for k in ("levels", "assignment", "hardware", "refit")} == {
        "levels": "log2", "assignment": "sample", "hardware": True, "refit": False}
    assert (loaded["layers"]["levels"] == "log2").all() and not loaded["layers"]["zero_level"].any()
    assert (loaded["layers"]["input_bits"] == 8).all()  # the hardware variant's 8-bit activations
    assert loaded["config"]["bits"] == 4 and set(loaded["test_accuracy"]) == {"float", "focused", "deep compression", "pruned only", "deep compression fp16 codebooks"}
    assert "deep compression 3-bit" in loaded["stages"]["stage"].tolist() and "command" in loaded["record"]["results"]
    assert main(["--out", str(out), "--sparsity", "1.5"]) == 2
    with pytest.raises(FileNotFoundError, match="not a saved compression result"):
        load_results(tmp_path)


def test_a_longer_final_step_ends_at_its_best_validation_epoch(digits_baseline, digits, tmp_path):
    from cpq_lib.artefacts import load_artefact
    from cpq_lib.sparse.pipeline import stage_keys

    model, _ = digits_baseline
    config = CompressionConfig(sparsity=0.6, prune_steps=1, prune_epochs=0, bits=5, baseline_bits=4, fractions=(0.5, 1.0),
                               final_epochs=3)
    assert config.quantization_epochs == 1 + 3
    result = compress_model(model, digits, config, TRAIN, tmp_path, progress=False)
    stages = result["stages"].set_index("stage")
    key = stage_keys(model, digits, config, TRAIN)["focused"].extend("sparse/focused", {"step": 2}).extend(
        "sparse/best-epoch", {"epochs": 3, "seed": config.seed + 102})
    best = load_artefact(tmp_path / "focused-2.best", key)
    assert best is not None and 1 <= best["epoch"] <= 3
    assert stages.loc["focused 1", "val_accuracy"] == pytest.approx(best["val_accuracy"])  # the model is the best epoch's
    assert "pruned only, +4 epochs" in stages.index  # the controls get the same budget and the same choice
    assert (tmp_path / "baseline.best").is_file() and (tmp_path / "pruned-only.best").is_file()
    with pytest.raises(ValueError, match="final_epochs must be a positive integer or None, got 0"):
        CompressionConfig(final_epochs=0)


def test_command_line_runs_each_seed_in_its_own_folders_and_reads_them_together(tmp_path, quick_baseline_dir, capsys):
    import shutil

    import pandas as pd

    from cpq_lib.sparse.__main__ import main
    from cpq_lib.sparse.pipeline import load_results

    run = tmp_path / "runs"
    shutil.copytree(quick_baseline_dir, run / "baseline")
    out = tmp_path / "out"
    argv = ["--out", str(out), "--run-dir", str(run / "focused"), "--sparsity", "0.6", "--prune-steps", "1", "--prune-epochs", "0",
            "--fractions", "1.0", "--bits", "4", "--baseline-bits", "3"]
    assert main([*argv, "--seeds", "1", "1"]) == 2 and "--seeds [1, 1]: each seed once" in capsys.readouterr().err
    assert main([*argv, "--seeds", "0", "1"]) == 0
    runs = [load_results(out / f"s{seed}") for seed in (0, 1)]
    assert [r["config"]["seed"] for r in runs] == [0, 1] and [r["record"]["config"]["seed"] for r in runs] == [0, 1]
    assert (run / "focused" / "s0" / "baseline.pt").is_file() and (run / "focused" / "s1" / "baseline.pt").is_file()
    # the seed reaches the fine-tuning: the focused weights, so their coded sizes, differ (this model's accuracies saturate)
    assert runs[0]["sizes"]["bits"].tolist() != runs[1]["sizes"]["bits"].tolist()
    accuracy = pd.read_csv(out / "accuracy.csv").set_index("method")
    for method in ("focused", "deep compression", "pruned only"):
        assert accuracy.loc[method, "mean"] == pytest.approx(50 * (runs[0]["test_accuracy"][method] + runs[1]["test_accuracy"][method]))
    contrasts = pd.read_csv(out / "contrasts.csv")
    assert contrasts["pairs"].tolist() == [2, 2, 2]
    assert {"ratios.csv", "stages.csv"} <= {p.name for p in out.iterdir()}
