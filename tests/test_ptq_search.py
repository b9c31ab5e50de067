"""PTQ-SL scale search: validation, an independent brute-force check, the metric it reports, never worse than its start."""

from __future__ import annotations

import copy
import shutil

import pandas as pd
import pytest
import torch
import torch.nn.functional as F

from cpq_lib.ptq import ScaleSearchConfig, granularity_correlation, markdown_report, ptqsl_study, reordering_verdict, search_scales_
from cpq_lib.ptq import study as study_module
from cpq_lib.ptq.__main__ import main as ptq_main
from cpq_lib.quant import QuantConfig, calibrate_, quantize_, quantized_layers

ALL_POSITIONS = 10**7  # more than the calibration images have: the search sees every output position


@pytest.mark.parametrize("kwargs,message", [
    ({"steps": 0}, "steps: must be an integer >= 1, got 0"), ({"alpha": 1.2, "beta": 1.2}, "alpha must be below beta"),
    ({"alpha": 2.0}, "alpha must be below beta"), ({"metric": "kl"}, "metric: 'kl' is not allowed"),
    ({"alpha": -0.1}, "alpha: must be a finite number > 0"), ({"chunk": 0}, "chunk: must be an integer >= 1"),
    ({"rounds": 1.5}, "rounds: must be an integer >= 1"),
])
def test_bad_search_settings_get_clear_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ScaleSearchConfig(**kwargs)


def test_bad_block_shapes_get_clear_errors(digits_baseline):
    model, _ = digits_baseline
    with pytest.raises(ValueError, match="blocks: granularity 'block' needs two positive group counts"):
        QuantConfig(granularity="block", blocks=(0, 2))
    with pytest.raises(ValueError, match=r"layer 'features.0.0' \(weight \(32, 16, 3, 3\)\).*1..32.*got 40"):
        quantize_(copy.deepcopy(model), QuantConfig(granularity="block", blocks=(40, 1)))


def test_factors_are_the_paper_grid_plus_the_start():
    factors = ScaleSearchConfig(alpha=0.01, beta=1.2, steps=100).factors()
    assert len(factors) == 102 and factors[0] == pytest.approx(0.01) and factors[100] == pytest.approx(1.2)
    assert factors[50] == pytest.approx(0.01 + 50 * 1.19 / 100) and factors[-1] == 1.0


def _quantized(model, calibration, **config):
    quantized = quantize_(copy.deepcopy(model), QuantConfig(**config)).eval()
    return calibrate_(quantized, calibration)


def _layer_io(model, name, images):
    """(input, output) of the layer ``name`` in ``model`` on ``images``."""
    seen = {}
    layer = dict(model.named_modules())[name]
    handle = layer.register_forward_hook(lambda module, inputs, output: seen.update(x=inputs[0], y=output))
    with torch.no_grad():
        model(images)
    handle.remove()
    return seen["x"], seen["y"]


def test_vectorised_weight_search_matches_a_brute_force_loop(digits_baseline, digits):
    """Independent check: per row group, try every candidate with a plain convolution; same best L2 per group."""
    model, _ = digits_baseline
    calibration = list(digits.calibration_loader(64, seed=0, batch_size=64))
    images = calibration[0][0]
    settings = ScaleSearchConfig(metric="l2", rounds=1, search_activations=False, steps=20, chunk=7, positions=ALL_POSITIONS)
    quantized = _quantized(model, calibration, weight_bits=3, act_bits=None, granularity="block", blocks=(4, 1))
    name, layer = quantized_layers(quantized)[0]
    quantizer = layer.weight_quantizer
    scale0 = quantizer.scale.detach().clone()
    x, _ = _layer_io(quantized, name, images)
    _, target = _layer_io(model, name, images)
    groups = quantizer.row_groups
    best = torch.full((4,), float("inf"))
    for factor in settings.factors():
        for group in range(4):
            trial = scale0.clone()
            trial[group] = scale0[group] * factor
            quantizer.scale.copy_(trial)
            output = F.conv2d(x, quantizer(layer.weight), layer.bias, layer.stride, layer.padding)
            error = ((output - target) ** 2)[:, groups == group].sum()
            best[group] = torch.minimum(best[group], error)
    quantizer.scale.copy_(scale0)
    search_scales_(quantized, model, calibration, settings, progress=False)
    output = F.conv2d(x, quantizer(layer.weight), layer.bias, layer.stride, layer.padding)
    achieved = torch.stack([((output - target) ** 2)[:, groups == g].sum() for g in range(4)])
    torch.testing.assert_close(achieved, best, rtol=1e-4, atol=1e-3)
    assert not torch.equal(quantizer.scale, scale0)


def test_layer_cosine_search_matches_a_brute_force_coordinate_descent(digits_baseline, digits):
    """Independent check of the authors' objective: row groups in turn, each trying every candidate with a plain
    convolution and keeping it when the whole layer output's cosine improves; the same scales come out."""
    model, _ = digits_baseline
    calibration = list(digits.calibration_loader(64, seed=0, batch_size=64))
    images = calibration[0][0]
    settings = ScaleSearchConfig.authors(rounds=1, search_activations=False, steps=20, chunk=5, positions=ALL_POSITIONS)
    assert settings.metric == "layer_cosine"
    quantized = _quantized(model, calibration, weight_bits=3, act_bits=None, granularity="block", blocks=(8, 1),
                           weight_grid="full")
    name, layer = quantized_layers(quantized)[0]
    quantizer = layer.weight_quantizer
    scale0 = quantizer.scale.detach().clone()
    x, _ = _layer_io(quantized, name, images)
    _, target = _layer_io(model, name, images)

    def cosine_error(scale):
        quantizer.scale.copy_(scale)
        y = F.conv2d(x, quantizer(layer.weight), layer.bias, layer.stride, layer.padding)
        return float(1 - (y * target).sum() / (y.norm() * target.norm()))

    expected = scale0.clone()
    for group in range(8):
        best, choice = cosine_error(expected), expected
        for factor in settings.factors():
            trial = expected.clone()
            trial[group] = scale0[group] * factor
            error = cosine_error(trial)
            if error < best:
                best, choice = error, trial
        expected = choice
    per_group = copy.deepcopy(quantized)  # the per-row-group cosine chooses otherwise here: the test tells them apart
    quantizer.scale.copy_(scale0)
    search_scales_(quantized, model, calibration, settings, progress=False)
    torch.testing.assert_close(quantizer.scale, expected, rtol=1e-5, atol=0)
    assert not torch.equal(expected, scale0)
    dict(per_group.named_modules())[name].weight_quantizer.scale.copy_(scale0)
    search_scales_(per_group, model, calibration, ScaleSearchConfig(**{**settings.__dict__, "metric": "cosine"}), progress=False)
    assert not torch.equal(dict(per_group.named_modules())[name].weight_quantizer.scale, expected)


@pytest.mark.parametrize("metric", ["cosine", "layer_cosine", "l2", "grad_l2"])
def test_search_never_worse_than_its_start_and_reports_the_true_metric(metric, digits_baseline, digits):
    model, _ = digits_baseline
    calibration = list(digits.calibration_loader(128, seed=0, batch_size=64))
    quantized = _quantized(model, calibration, weight_bits=3, act_bits=4, granularity="block", blocks=(4, 2))
    starts = {name: (layer.weight_quantizer.scale.clone(), layer.input_quantizer.scale.clone())
              for name, layer in quantized_layers(quantized)}
    table = search_scales_(quantized, model, calibration, ScaleSearchConfig(metric=metric, positions=ALL_POSITIONS), progress=False)
    assert (table["metric_end"] < table["metric_start"]).all(), table
    for name, layer in quantized_layers(quantized):
        assert not torch.equal(layer.weight_quantizer.scale, starts[name][0])
    if metric == "grad_l2":
        return  # its weights come from a backward pass; the two plain metrics are recomputed below
    for name, _ in quantized_layers(quantized):  # recompute from the modules themselves, over every position
        outputs, targets = [], []
        for images, _ in calibration:
            outputs.append(_layer_io(quantized, name, images)[1])
            targets.append(_layer_io(model, name, images)[1])
        y, t = torch.cat(outputs), torch.cat(targets)
        value = 1 - (y * t).sum() / (y.norm() * t.norm()) if "cosine" in metric else ((y - t) ** 2).sum()
        reported = table.set_index("layer").loc[name, "metric_end"]
        assert float(value) == pytest.approx(reported, rel=1e-3, abs=1e-6)


def test_search_refuses_models_it_cannot_search(digits_baseline, digits):
    model, _ = digits_baseline
    calibration = list(digits.calibration_loader(32, seed=0))
    with pytest.raises(ValueError, match="no quantized layers"):
        search_scales_(copy.deepcopy(model), model, calibration, progress=False)
    asymmetric = _quantized(model, calibration, symmetric=False)
    with pytest.raises(ValueError, match="symmetric weight quantizers.*'features.0.0' is asymmetric"):
        search_scales_(asymmetric, model, calibration, progress=False)
    with pytest.raises(ValueError, match="calibration data is empty"):
        search_scales_(_quantized(model, calibration), model, [], progress=False)


def test_study_rows_variants_and_resume(digits_baseline, digits, tmp_path, monkeypatch):
    model, _ = digits_baseline
    calibration = digits.calibration_loader(64, seed=0)
    grains = {"layer": ("tensor", None), "2x2": ("block", (2, 2)), "channel": ("channel", None)}
    out = tmp_path / "study.csv"
    fast = ScaleSearchConfig(steps=10, rounds=1, positions=512)
    first = ptqsl_study(model, digits, ["W4A8"], calibration, {"layer": grains["layer"]}, search=fast, out=out, progress=False)
    assert len(first) == 2 and set(first["reorder"]) == {"none"}
    calls = []
    original = study_module.quantize_
    monkeypatch.setattr(study_module, "quantize_", lambda *a, **k: calls.append(1) or original(*a, **k))
    full = ptqsl_study(model, digits, ["W4A8"], calibration, grains, search=fast, out=out, progress=False)
    assert len(calls) == 6  # the two layer-wise rows came from the CSV; 2x2 gets 2 reorders x 2 searches, channel 2
    assert len(full) == 8 and full["granularity"].tolist()[:2] == ["layer", "layer"]
    assert set(full[full["granularity"] == "2x2"]["reorder"]) == {"none", "permute"}
    indexed = full.set_index(["granularity", "reorder", "search"])
    assert indexed["scales"].to_dict()[("channel", "none", True)] == 32 + 64
    # a permuted network stores no maps: metadata is its fp32 scales alone
    assert (full["scale_bits"] == 32 * full["scales"]).all() and (full["map_bits"] == 0).all()
    assert (full["metadata_bits"] == full["scale_bits"]).all()
    # a permuted network is searched against a float reference permuted alike (compared unpermuted: chance level)
    assert (full.loc[full["search"], "val_accuracy"] > 0.8).all(), full[["granularity", "reorder", "search", "val_accuracy"]]
    assert pd.read_csv(out).shape[0] == 8
    with pytest.raises(ValueError, match=r"splits: \['dev'\] not allowed"):
        ptqsl_study(model, digits, ["W4A8"], calibration, grains, splits=("dev",), progress=False)
    with pytest.raises(ValueError, match="target 'X4'"):
        ptqsl_study(model, digits, ["X4"], calibration, grains, progress=False)


def test_correlation_and_verdict_on_a_known_table():
    rows = [("channel", "none", 100, 0.80), ("layer", "none", 2, 0.10), ("4x1", "none", 8, 0.50), ("4x1", "permute", 8, 0.70),
            ("8x1", "permute", 16, 0.85), ("16x4", "permute", 640, 0.9)]
    table = pd.DataFrame([{"target": "W4A8", "granularity": g, "reorder": r, "search": False, "scales": s, "val_accuracy": a}
                          for g, r, s, a in rows])
    rho = granularity_correlation(table).set_index(["target", "reorder"])["spearman_rho"]
    # by hand: scale ranks 5, 1, 2.5, 2.5, 4, 6 and accuracy ranks 4, 1, 2, 3, 5, 6 -> 16 / sqrt(17 * 17.5)
    assert rho[("W4A8", "all")] == pytest.approx(16 / (17 * 17.5) ** 0.5, abs=1e-9) and rho[("W4A8", "permute")] == pytest.approx(1.0)
    verdict = reordering_verdict(table).iloc[0]
    assert verdict["best_reordered"] == "8x1" and verdict["beats_channel"] and verdict["difference"] == pytest.approx(0.05)
    report = markdown_report(table)
    assert "| W4A8 | permute |  | 70.00 | 85.00 |  | 90.00 |" in report and "W4A8 +0.93" in report
    few = markdown_report(table[table["granularity"].isin(["channel", "layer"])])  # too few points for a correlation
    assert "needs 3 or more granularities" in few
    assert "| W4A8 | permute | no | 80.00 (100) | 8x1: 85.00 (16) | +5.00 |" in report
    assert reordering_verdict(table, reorder="index_sort").empty  # a reordering the table lacks has no verdict


def test_command_line_writes_csv_and_record(tmp_path, quick_baseline_dir, capsys):
    run = tmp_path / "run"
    shutil.copytree(quick_baseline_dir, run / "baseline")
    out = tmp_path / "out" / "ptqsl.csv"
    code = ptq_main(["--profile", "quick", "--out", str(out), "--run-dir", str(run), "--targets", "W4A4",
                     "--granularities", "layer", "2x2", "--reorders", "index_sort", "--calibration-images", "64", "--rounds", "1"])
    assert code == 0
    table = pd.read_csv(out)
    assert len(table) == 4 and set(table["reorder"]) == {"none", "index_sort"}
    blocks = table[table["granularity"] == "2x2"]
    assert (blocks.loc[blocks["reorder"] == "index_sort", "map_bits"] > 0).all()  # index maps are charged
    assert (blocks.loc[blocks["reorder"] == "none", "map_bits"] == 0).all()
    assert out.with_suffix(".json").is_file() and "spearman_rho" not in capsys.readouterr().err
    assert ptq_main(["--report", str(out)]) == 0 and "| W4A4 | index_sort + search |" in capsys.readouterr().out
    legacy = tmp_path / "legacy.csv"  # a study written when the index-map variant was called "sort"
    table.assign(reorder=table["reorder"].replace({"index_sort": "sort"})).to_csv(legacy, index=False)
    assert ptq_main(["--report", str(legacy)]) == 0 and "| W4A4 | index_sort + search |" in capsys.readouterr().out
    assert ptq_main(["--report", str(tmp_path / "missing.csv")]) == 2 and ptq_main(["--profile", "quick"]) == 2
    assert ptq_main(["--out", str(tmp_path), "--profile", "quick"]) == 2
    with pytest.raises(SystemExit) as exited:  # argparse refuses it
        ptq_main(["--out", str(out), "--rounds", "0"])
    assert exited.value.code == 2

    # the same CSV with other row settings: refused, the CSV and its record untouched (they used to be rewritten)
    before = {p.name: p.read_bytes() for p in out.parent.iterdir()}
    capsys.readouterr()
    code = ptq_main(["--profile", "quick", "--out", str(out), "--run-dir", str(run), "--targets", "W4A4",
                     "--granularities", "layer", "2x2", "--reorders", "index_sort", "--calibration-images", "32", "--rounds", "3",
                     "--positions", "64", "--metric", "l2"])
    err = capsys.readouterr().err
    assert code == 2 and "made with other settings" in err and "search.positions: 2048 -> 64" in err, err
    assert "search.rounds: 1 -> 3" in err and "calibration" in err and "choose another --out" in err
    assert {p.name: p.read_bytes() for p in out.parent.iterdir()} == before
    # a new target extends the same study: allowed, the earlier rows are kept
    assert ptq_main(["--profile", "quick", "--out", str(out), "--run-dir", str(run), "--targets", "W4A4", "W3A8",
                     "--granularities", "layer", "--calibration-images", "64", "--rounds", "1"]) == 0
    extended = pd.read_csv(out)
    assert len(extended) == 6 and extended.iloc[:4].equals(table)


@pytest.mark.parametrize("argv,message", [
    (["--targets", "W4X8"], "target 'W4X8': expected W<bits>A<bits>"),
    (["--targets", "W99A4"], "target 'W99A4'"),
    (["--set", "model.name"], "--set expects KEY=VALUE"),
    (["--set", "model.name=foo"], "'foo'"),
    (["--set", "train.lr=nan"], "train.lr"),
    (["--device", "cuda"], "no CUDA device"),
    (["--out", "{file}/x.csv"], "is a file, so the folder cannot be made there"),
    (["--out", "{tmp}"], "is a folder"),
])
def test_command_line_refuses_bad_arguments_before_loading_anything(argv, message, tmp_path, capsys, monkeypatch):
    import torch

    if argv == ["--device", "cuda"] and torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the request is valid here")
    from cpq_lib.ptq import __main__ as cli

    monkeypatch.setattr(cli, "load_data", lambda config: pytest.fail("data loaded before the arguments were checked"))
    (tmp_path / "afile").write_text("x")
    argv = [a.format(file=tmp_path / "afile", tmp=tmp_path) for a in argv]
    out = ["--out", str(tmp_path / "s.csv")] if "--out" not in argv else []
    assert cli.main(["--profile", "quick", *out, *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and "Traceback" not in err, err
    assert not (tmp_path / "s.json").exists() and not (tmp_path / "s.csv").exists()


def test_command_line_refuses_a_calibration_of_zero_images(capsys, tmp_path):
    with pytest.raises(SystemExit) as exited:
        ptq_main(["--profile", "quick", "--out", str(tmp_path / "s.csv"), "--calibration-images", "0"])
    assert exited.value.code == 2 and "--calibration-images: 0 is not allowed; give an integer >= 1" in capsys.readouterr().err


@pytest.mark.parametrize("content,message", [
    ("", "is not a study CSV"), ("a,b\n1,2\n", "it lacks the columns ['target'"),
    ("target,granularity,reorder,search,scales\nW4A8,layer,none,False,2\n", "it has no accuracy column"),
    ("target,granularity,reorder,search,scales,val_accuracy\n", "it has no rows"),
])
def test_report_of_a_file_that_is_not_a_study_names_it(content, message, tmp_path, capsys):
    path = tmp_path / "t.csv"
    path.write_text(content)
    assert ptq_main(["--report", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err, err
    assert ptq_main(["--report", str(tmp_path)]) == 2 and "is a folder" in capsys.readouterr().err


def test_study_refuses_a_csv_made_with_other_settings(digits_baseline, digits, tmp_path):
    from cpq_lib.artefacts import ArtefactMismatchError, read_key_file

    model, _ = digits_baseline
    calibration = list(digits.calibration_loader(32, seed=0))
    grains = {"layer": ("tensor", None)}
    out = tmp_path / "study.csv"
    ptqsl_study(model, digits, ["W4A8"], calibration, grains, searches=(False,), out=out, progress=False)
    csv, key = out.read_bytes(), read_key_file(out)
    assert key is not None and key.kind == "ptq-study"
    for change in ({"calibration": list(digits.calibration_loader(32, seed=1))},
                   {"search": ScaleSearchConfig(positions=64)}, {"exclude": ("@first",)}):
        arguments = {"calibration": calibration, **change}
        with pytest.raises(ArtefactMismatchError, match="made with other settings"):
            ptqsl_study(model, digits, ["W4A8"], granularities=grains, searches=(False,), out=out, progress=False, **arguments)
        assert out.read_bytes() == csv and read_key_file(out) == key
    other_model = copy.deepcopy(model)
    with torch.no_grad():
        next(other_model.parameters()).add_(1e-3)
    with pytest.raises(ArtefactMismatchError, match="model"):
        ptqsl_study(other_model, digits, ["W4A8"], calibration, grains, searches=(False,), out=out, progress=False)
    (tmp_path / "study.csv.key.json").unlink()  # a CSV without a key is not extended either
    with pytest.raises(ArtefactMismatchError, match="carries no key"):
        ptqsl_study(model, digits, ["W4A8"], calibration, grains, searches=(False,), out=out, progress=False)


def test_constant_accuracy_has_no_correlation_and_no_warning():
    import warnings

    table = pd.DataFrame([{"target": "W4A8", "granularity": g, "reorder": "none", "search": False, "scales": s, "val_accuracy": 0.9}
                          for g, s in (("layer", 2), ("4x1", 8), ("channel", 100))])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rho = granularity_correlation(table)
    assert rho["spearman_rho"].isna().all() and rho["p_value"].isna().all() and len(rho) == 2


def test_candidates_equal_but_for_the_last_bits_go_to_the_first():
    """The cosine metrics tie exactly when a scale moves without changing codes; the summation order
    splits such ties in the last bits, differently per CPU. The first tied candidate wins either way."""
    from cpq_lib.ptq.search import _clearly_below, _first_best

    tied = torch.tensor([[0.5, 0.2], [0.3, 0.1], [0.3 - 1e-15, 0.1 + 1e-16], [0.4, 0.1 - 1e-16]], dtype=torch.float64)
    value, index = _first_best(tied)
    assert index.tolist() == [1, 1] and value.tolist() == [0.3, 0.1]
    value, index = _first_best(torch.tensor([[0.3], [0.3 - 1e-6]], dtype=torch.float64))  # a real difference
    assert index.tolist() == [1]
    best = torch.tensor([0.3, 0.3], dtype=torch.float64)
    assert _clearly_below(torch.tensor([0.3 - 1e-15, 0.3 - 1e-6], dtype=torch.float64), best).tolist() == [False, True]
