"""Benchmark scripts run end to end on tiny settings and record what produced their numbers.

Timings are not asserted (they belong in benchmarks/results, measured with nothing else running);
what is checked is that each script works, writes a complete record, and that the scoring benchmark's
correctness claim (batched scores equal the per-image loop's) holds.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"


@pytest.fixture()
def bench(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    common = importlib.import_module("common")
    monkeypatch.setattr(common, "RESULTS", tmp_path)

    def run(name: str, *args: str) -> dict:
        module = importlib.import_module(name)
        monkeypatch.setattr(sys, "argv", [str(BENCHMARKS / f"{name}.py"), *args])
        assert module.main(list(args)) == 0
        record = json.loads((tmp_path / f"{name}.json").read_text())
        assert record["command"] == f"python benchmarks/{name}.py " + " ".join(args)
        assert record["machine"]["threads"] >= 1 and "date" in record and "git_commit" in record
        return record

    return run


def test_bench_quant_records_both_ratios(bench):
    record = bench("bench_quant", "--repeats", "1", "--batch", "4")
    assert record["batch"] == 4 and record["repeats"] == 1
    for key in ("eval_ratio", "train_step_ratio"):
        assert record[key] > 0
    assert set(record["eval_seconds"]) == {"fp32", "quantized"}


def test_bench_data_records_images_per_second(bench, cifar10_zip):
    record = bench("bench_data", "--data-root", str(cifar10_zip), "--steps", "1", "--repeats", "1", "--batch", "8")
    assert set(record["images_per_second"]) == {"random data", "cifar10 loader"} and record["ratio"] > 0


def test_bench_scoring_checks_same_scores(bench, cifar10_zip):
    record = bench("bench_scoring", "--data-root", str(cifar10_zip), "--repeats", "1", "--per-class", "3")
    assert record["images"] == 30 and record["aggregate"] == "position"
    assert record["same_scores"] is True
    assert record["scoring_vs_training_pass"] > 0 and record["per_image_vs_scoring"] > 0


def test_bench_ptq_records_the_ratio(bench, cifar10_zip):
    record = bench("bench_ptq", "--data-root", str(cifar10_zip), "--repeats", "1", "--calibration-images", "20",
                   "--positions", "64", "--steps", "4", "--val-images", "200")
    assert record["calibration_images"] == 20 and record["search"]["steps"] == 4 and record["validation_images"] == 200
    assert record["ptqsl_vs_validation_pass"] > 0 and set(record["seconds"]) == {"validation pass", "PTQ-SL"}


def test_bench_shift_records_the_ratio_and_the_agreement(bench):
    record = bench("bench_shift", "--batch", "1", "--repeats", "1")
    assert record["focused_layers"] == 20 and record["batch"] == 1 and record["same_classes"] is True
    assert record["shift_add_vs_fp32"] > 0 and record["fake_quantized_vs_fp32"] > 0
    assert record["max_logit_difference"] < 0.05 and set(record["seconds"]) == {"fp32", "fake-quantized", "shift-add"}


def test_bench_coding_records_exact_round_trips(bench):
    record = bench("bench_coding", "--repeats", "1", "--sparsity", "0.95", "--bits", "3")
    assert record["exact_round_trip"] is True and set(record["coders"]) == {"huffman", "ans", "zstd"}
    ans = record["coders"]["ans"]
    assert 1.0 <= ans["payload_over_entropy"] < 1.05 and ans["encode_weights_per_s"] > 0
    assert record["coders"]["zstd"]["encode_vs_zstd"] == 1.0


def test_bench_gpu_says_so_and_exits_0_without_a_gpu(monkeypatch, capsys):
    import torch

    monkeypatch.syspath_prepend(str(BENCHMARKS))
    module = importlib.import_module("bench_gpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert module.main([]) == 0
    assert "no CUDA device on this machine" in capsys.readouterr().out


def test_bench_gpu_goals_are_judged_as_the_issue_states(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    goals = importlib.import_module("bench_gpu").goals
    fp32 = {"task": "fp32", "batch": 128, "trainer_vs_pure": 1.10, "trainer_compiled_vs_pure": 1.0,
            "epoch_seconds": {"pure": 1.6, "trainer": 1.76, "trainer_compiled": 1.6}}
    qat = {"task": "qat_kd", "batch": 128, "trainer_vs_pure": 1.2, "trainer_compiled_vs_pure": 0.9,
           "epoch_seconds": {"pure": 3.0, "trainer": 3.6, "trainer_compiled": 3.2}}
    found = goals([fp32, qat])
    assert found["fp32 b128 trainer_vs_pure"]["met"]  # within 10%: met at exactly 1.10
    assert not found["fp32 b128 trainer_compiled_vs_pure"]["met"]  # must be below the pure step
    assert found["fp32 b128 400 epochs (s)"] == {"value": 640.0, "goal": 600.0, "met": False}
    assert not found["qat_kd b128 trainer_vs_pure"]["met"] and found["qat_kd b128 trainer_compiled_vs_pure"]["met"]
    assert found["qat_kd vs fp32 b128 (compiled trainer)"] == {"value": 2.0, "goal": 2.0, "met": True}


def test_bench_precision_times_each_precision_in_its_own_process(bench, monkeypatch):
    module = importlib.import_module("bench_precision")
    assert set(module.VARIANTS) == {"float32", "float64", "float64, MKL automatic branch"}
    monkeypatch.setattr(module, "VARIANTS", {k: module.VARIANTS[k] for k in ("float32", "float64")})  # two processes suffice here
    record = bench("bench_precision", "--repeats", "1", "--epochs", "1")
    assert set(record["seconds"]) == {"float32", "float64"}
    assert all(len(t) == 1 and t[0] > 0 for t in record["seconds"].values())
    assert set(record["ratio_to_float32"]) == {"float64"}


def test_bench_onnx_times_every_export_against_fp32(bench):
    pytest.importorskip("onnxruntime", reason="the ONNX benchmark needs onnxruntime")
    record = bench("bench_onnx", "--repeats", "1", "--batch", "2")
    assert set(record["ratio_to_fp32"]) == {f"{name} ({mode})" for name in ("W8A8", "mixed 0-6 bits, A4")
                                             for mode in ("optimized", "unoptimized")}
    assert all(len(t) == 1 and t[0] > 0 for t in record["seconds"].values()) and len(record["seconds"]) == 6


def test_bench_search_bn_records_the_ratio(bench, cifar10_zip):
    record = bench("bench_search_bn", "--data-root", str(cifar10_zip), "--repeats", "1", "--images", "20")
    assert record["images"] == 20 and record["ratio_bn_vs_stale"] > 0
    assert set(record["seconds"]) == {"BN re-estimated (512 images)", "stale BN"}


def test_bench_quant_times_the_learnable_scale_student_too(bench):
    record = bench("bench_quant", "--repeats", "1", "--batch", "2")
    assert set(record["train_step_seconds"]) == {"fp32", "quantized", "quantized_lsq"} and record["train_step_ratio_lsq"] > 0


def test_bench_compile_records_compiled_against_eager(bench):
    record = bench("bench_compile", "--repeats", "1", "--batch", "2", "--tasks", "fp32")
    assert set(record["step_seconds"]) == {"fp32_eager", "fp32_compiled"} and record["compiled_vs_eager"]["fp32"] > 0
    assert record["mode"] == "default" and record["first_step_seconds"]["fp32_compiled"] > 0


def test_bench_peers_times_brevitas_or_says_how_to_install_it(bench, capsys, monkeypatch):
    try:
        import brevitas  # noqa: F401
    except ImportError:
        monkeypatch.syspath_prepend(str(BENCHMARKS))
        assert importlib.import_module("bench_peers").main(["--repeats", "1", "--batch", "2"]) == 2
        assert "pip install -r benchmarks/requirements-peers.txt" in capsys.readouterr().out
        return
    record = bench("bench_peers", "--repeats", "1", "--batch", "2")
    assert set(record["train_step_ratio"]) == set(record["eval_ratio"]) == {"cpq", "cpq_lsq", "brevitas"}


@pytest.mark.shared_data
def test_bench_hessian_records_trace_cost_against_a_validation_pass(bench, cifar10_zip):
    record = bench("bench_hessian", "--data-root", str(cifar10_zip), "--repeats", "1", "--max-probes", "2",
                   "--val-images", "50", "--trace-images", "20")
    assert record["validation_images"] == 50 and record["trace_images"] == 20
    assert record["cost"]["hawq"] == {"estimates": 1, "probes": 2, "hessian_vector_products": 2, "converged": False}
    assert record["cost"]["hawq_class"]["estimates"] == 10 and record["ratio_vs_validation_pass"]["hawq"] > 0


def test_bench_memory_measures_both_data_paths_in_their_own_processes(bench, tmp_path):
    record = bench("bench_memory", "--images", "240", "480", "--image-size", "16", "--method", "uniform")
    assert {(row["path"], row["images"]) for row in record["rows"]} == {
        (path, images) for path in ("read lazily (Dataset)", "decoded in memory") for images in (240, 480)}
    assert all(row["peak_rss_mb"] > 50 and row["evaluations"] >= 1 for row in record["rows"])
    assert set(record["growth"]) == {"read lazily (Dataset)", "decoded in memory"}
    assert (tmp_path / "bench_memory.png").is_file()
