"""``python -m cpq_lib.deploy``: a quantized model from a run folder, uniform bits or a plan, as ONNX."""

from __future__ import annotations

import json
import shutil

import pytest

pytest.importorskip("onnxruntime", reason="the deploy command verifies with onnxruntime (a dependency; missing here)")

from cpq_lib.deploy import main  # noqa: E402
from cpq_lib.experiment import run_experiment  # noqa: E402
from cpq_lib.config import make_config  # noqa: E402


@pytest.fixture()
def run_root(tmp_path, quick_baseline_dir):
    shutil.copytree(quick_baseline_dir, tmp_path / "runs" / "baseline")
    return tmp_path / "runs"


def _verified(out):
    report = json.loads(out.with_name(out.name + ".verify.json").read_text())
    return report["results"]["verify"]


def test_uniform_bits_on_the_cached_baseline(run_root, tmp_path, capsys):
    out = tmp_path / "out" / "digits-W4A4.onnx"
    assert main(["--profile", "quick", "--run-dir", str(run_root), "--bits", "W4A4", "--out", str(out),
                 "--verify", "val"]) == 0
    assert out.is_file() and "top-1 agreement" in capsys.readouterr().out
    for mode, result in _verified(out).items():
        assert result["inputs"] == 144 and result["top1_agreement"] >= 0.99, (mode, result)
        assert abs(result["cpq_accuracy"] - result["onnx_accuracy"]) <= 0.01


def test_a_finished_experiment_and_its_plan(run_root, tmp_path):
    config = make_config("quick", {"allocation.method": "uniform", "refine.epochs": 1})
    record = run_experiment(config, run_root / "exp", shared_dir=run_root, progress=False)
    out = tmp_path / "refined.onnx"
    assert main(["--run", str(run_root / "exp"), "--out", str(out), "--verify", "val"]) == 0
    verified = _verified(out)["optimizations off"]
    assert verified["cpq_accuracy"] == pytest.approx(record["results"]["after_refinement"]["val_accuracy"], abs=1e-9)
    assert verified["top1_agreement"] >= 0.99
    plan_out = tmp_path / "plan.onnx"
    assert main(["--profile", "quick", "--run-dir", str(run_root), "--plan", str(run_root / "exp" / "record.json"),
                 "--out", str(plan_out)]) == 0 and plan_out.is_file()


@pytest.mark.parametrize("argv,message", [
    (["--bits", "W4"], "give activation bits too"),
    (["--bits", "W4X8"], "target 'W4X8'"),
    (["--plan", "{tmp}/missing.json"], "no such file"),
    (["--run", "{tmp}"], "record.json"),
    (["--bits", "W4A4", "--out", "{tmp}"], "is a folder"),
])
def test_bad_arguments_are_refused_before_loading(argv, message, tmp_path, capsys, monkeypatch):
    import cpq_lib.deploy as deploy

    monkeypatch.setattr(deploy, "load_data", lambda config: pytest.fail("data loaded before the arguments were checked"))
    argv = [a.format(tmp=tmp_path) for a in argv]
    out = [] if "--out" in argv else ["--out", str(tmp_path / "m.onnx")]
    assert main([*argv, *out]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err
    assert not (tmp_path / "m.onnx").exists()


def test_a_profile_without_a_baseline_is_not_trained_here(tmp_path, capsys):
    assert main(["--profile", "quick", "--run-dir", str(tmp_path / "empty"), "--bits", "W4A4",
                 "--out", str(tmp_path / "m.onnx")]) == 2
    assert "no cached baseline" in capsys.readouterr().err and not (tmp_path / "m.onnx").exists()
