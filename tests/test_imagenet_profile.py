"""The `imagenet` profile end to end on a generated ImageNet-style folder (10 classes, JPEGs of 64-300 px),
read lazily, with torchvision's MobileNetV2 (width 0.25, trained here): baseline, class scores, the
ClassPathQ search, KD refinement and the final report; PTQ-SL and focused quantization by their command
lines; and a lazily read training run resumed after an interruption, with other DataLoader workers."""

from __future__ import annotations

import json

import pytest
import torch

from cpq_lib.config import TrainConfig, make_config
from cpq_lib.data import load_dataset
from cpq_lib.data.synthetic import write_image_folder
from cpq_lib.experiment import run_experiment
from cpq_lib.models import build_model
from cpq_lib.train import train_model

SMALL = {"data.image_size": 32, "data.workers": 0, "data.val_fraction": 0.2, "model.name": "mobilenet_v2",
         "model.width": 0.25, "model.pretrained": False, "train.epochs": 2, "train.batch_size": 32, "device": "cpu"}
SEARCH = {"allocation.method": "classpath", "allocation.weight_bits": 3, "allocation.act_bits": 4, "allocation.start_bits": 4,
          "allocation.images_per_class": 4, "allocation.search_images": 20, "allocation.bn_images": 16,
          "allocation.calibration_images": 32, "allocation.sparsities": [0.5], "refine.epochs": 1, "refine.batch_size": 32,
          "allocation.max_gbitops": 100.0}  # a BitOPs budget too (not binding here), counted on the lazily read images


def _sets(overrides: dict) -> list[str]:
    return [item for key, value in overrides.items() for item in ("--set", f"{key}={json.dumps(value)}")]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("imagenet-like") / "root")


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    return tmp_path_factory.mktemp("shared")


@pytest.fixture(scope="module")
def record(folder, shared, tmp_path_factory):
    config = make_config("imagenet", {"data.root": str(folder), **SMALL, **SEARCH})
    return run_experiment(config, tmp_path_factory.mktemp("run"), shared_dir=shared, progress=False)


def test_the_imagenet_profile_runs_every_stage_on_a_lazily_read_folder(record, shared):
    config, results = record["config"], record["results"]
    assert config["profile"] == "imagenet" and config["data"]["name"] == "imagenet" and config["model"]["name"] == "mobilenet_v2"
    plan = results["plan"]["layers"]
    assert len(plan) >= 40  # MobileNetV2's convolutions (depthwise ones included) less the stem and classifier
    assert results["average_bits"] <= 3.06 and results["search"]["cost"]["evaluations"] >= 2
    assert 0 < results["plan"]["meta"]["gbitops"] <= 100.0
    assert results["plan"]["meta"]["gbitops"] == pytest.approx(results["metrics"]["bitops"] / 1e9, rel=1e-6)
    assert results["search"]["cost"]["validation_images"] == 20 and results["search"]["cost"]["bn_images"] == 16
    for stage in ("before_refinement", "after_refinement"):
        report = results[stage]
        assert 0.0 <= report["test_accuracy"] <= 1.0 and report["test_loss"] == report["test_loss"]  # finite
        assert sorted(report["per_class_test_accuracy"]) == [f"class{i:03d}" for i in range(10)]
    assert len(results["refinement"]["history"]) == 1
    assert (shared / "baseline" / "seed-0" / "model.pt").is_file()
    assert list((shared / "cache").iterdir())  # the class scores, cached for the next run


@pytest.mark.slow
def test_ptqsl_and_focused_quantization_run_on_the_folder_by_their_command_lines(record, folder, shared, tmp_path, capsys):
    from cpq_lib.ptq.__main__ import main as ptq_main
    from cpq_lib.sparse.__main__ import main as sparse_main

    common = ["--profile", "imagenet", "--data-root", str(folder), "--device", "cpu", *_sets({k: v for k, v in SMALL.items() if k != "device"})]
    out = tmp_path / "ptqsl.csv"
    assert ptq_main([*common, "--run-dir", str(shared), "--out", str(out), "--targets", "W4A8", "--granularities", "channel", "8x2",
                     "--calibration-images", "32", "--positions", "64", "--rounds", "1"]) == 0
    rows = __import__("pandas").read_csv(out)
    assert set(rows["granularity"]) == {"channel", "8x2"} and (rows["val_accuracy"].between(0, 1)).all()
    assert {"none", "permute"} <= set(rows["reorder"])  # the permutation found on MobileNetV2's graph
    sparse_out = tmp_path / "focused"
    assert sparse_main([*common, "--run-dir", str(shared / "focused"), "--out", str(sparse_out), "--prune-steps", "1",
                        "--prune-epochs", "1", "--quant-epochs", "1", "--fractions", "1.0", "--baseline-bits", "5"]) == 0
    summary = json.loads((sparse_out / "summary.json").read_text())
    assert set(summary["test_accuracy"]) >= {"float", "focused", "deep compression"}
    assert "test accuracy" in capsys.readouterr().out


def test_lazily_read_training_resumes_exactly_with_other_workers(folder, tmp_path):
    config = TrainConfig(epochs=2, batch_size=32, lr=0.05, compile="off")

    def fresh():
        torch.manual_seed(0)
        return build_model("digits_cnn", 10, in_channels=3, mean=[0.5] * 3, std=[0.25] * 3)

    data = load_dataset("imagenet", folder, image_size=32, val_fraction=0.2)
    whole = fresh()
    train_model(whole, data, config, seed=4, progress=False)

    class Killed(Exception):
        pass

    def stop(record):
        raise Killed  # after the epoch's state was saved, as a kill would leave it

    state = tmp_path / "state.pt"
    with pytest.raises(Killed):
        train_model(fresh(), data, config, seed=4, progress=False, state_path=state, on_epoch=stop)
    assert torch.load(state, weights_only=True)["epoch"] == 1
    with_workers = load_dataset("imagenet", folder, image_size=32, val_fraction=0.2, workers=2)
    resumed = fresh()
    result = train_model(resumed, with_workers, config, seed=4, progress=False, state_path=state)
    assert result.resumed_from_epoch == 1
    for key, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key
