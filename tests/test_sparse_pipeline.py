"""The compression pipeline end to end on the quick model: stages, sizes, and a resume that changes nothing."""

from __future__ import annotations

import pytest

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
                                         "deep compression 4-bit"]
    sizes = first["sizes"]
    assert set(sizes["method"]) == {"focused", "deep compression"} and set(sizes["coder"]) == {"huffman", "ans", "zstd"}
    assert (sizes[sizes["layer"] == "total"]["ratio"] > 1).all()
    focused = first["models"]["focused"]
    for name in first["layers"]["layer"]:
        weight = focused.get_submodule(name).weight
        assert float((weight == 0).float().mean()) == pytest.approx(0.7, abs=0.01)
    # a run killed after the first focused stage resumes to the same result
    for stale in ["focused-2.pt", "focused-2.state", "baseline.pt", "baseline.state"]:
        (tmp_path / "a" / stale).unlink()
    assert _summary(compress_model(model, digits, config, TRAIN, tmp_path / "a", progress=False)) == _summary(first)


@pytest.mark.parametrize("kwargs,message", [
    ({"sparsity": 1.0}, r"sparsity must be a number in \[0, 1\)"), ({"bits": 1}, "bits must be an integer >= 2"),
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
                 "--fractions", "1.0", "--bits", "4", "--baseline-bits", "3"])
    assert code == 0
    loaded = load_results(out)
    assert loaded["config"]["bits"] == 4 and set(loaded["test_accuracy"]) == {"float", "focused", "deep compression"}
    assert loaded["stages"]["stage"].tolist()[-1] == "deep compression 3-bit" and "command" in loaded["record"]["results"]
    assert main(["--out", str(out), "--sparsity", "1.5"]) == 2
    with pytest.raises(FileNotFoundError, match="not a saved compression result"):
        load_results(tmp_path)
