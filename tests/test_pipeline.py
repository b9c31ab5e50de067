import pytest
import torch

from cpq_lib.config import make_config
from cpq_lib.data import load_dataset
from cpq_lib.errors import CheckpointError
from cpq_lib.pipeline import baseline_model, check_card_matches


def test_baseline_is_trained_once_then_reused(digits, tmp_path):
    config = make_config("quick", {"train.epochs": 2})
    model, card = baseline_model(config, digits, tmp_path, progress=False)
    assert card["epochs"] == 2 and (tmp_path / "baseline" / "seed-0" / "model.pt").is_file()
    assert 0.0 <= card["test_accuracy"] <= 1.0 and set(card["per_class_test_accuracy"]) == set(digits.classes)
    again, card_again = baseline_model(config, digits, tmp_path, progress=False)
    assert card_again["history"] == card["history"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))
    # fresh and cached compute alike, bit for bit: same memory layout (training used channels_last)
    assert [p.stride() for p in model.parameters()] == [p.stride() for p in again.parameters()]
    x = digits.val.images[:64].float() / 255
    with torch.no_grad():
        assert torch.equal(model.eval()(x), again.eval()(x))


def test_card_must_match_split_and_classes(digits):
    card = {"data": digits.describe()}
    check_card_matches(card, digits, "here")
    with pytest.raises(CheckpointError, match="another validation split"):
        check_card_matches(card, load_dataset("digits", split_seed=4), "here")
    card["data"]["classes"] = list("abcdefghij")
    with pytest.raises(CheckpointError, match="class mismatch"):
        check_card_matches(card, digits, "here")


def test_split_mismatch_message_says_what_differs(digits):
    card = {"data": {**digits.describe(), "val_digest": "0123456789abcdef"}}  # same seed and fraction, other images
    with pytest.raises(CheckpointError, match="same split seed and fraction, so the data itself differs.*0123456789abcdef vs"):
        check_card_matches(card, digits, "here")
    other = load_dataset("digits", split_seed=4)
    with pytest.raises(CheckpointError, match="it used split seed 0, fraction 0.1; this data uses seed 4, fraction 0.1"):
        check_card_matches({"data": digits.describe()}, other, "here")


def test_a_cached_baseline_from_other_code_is_trained_again(digits, tmp_path, monkeypatch):
    import cpq_lib.pipeline as pipeline

    config = make_config("quick", {"train.epochs": 1})
    _, card = baseline_model(config, digits, tmp_path, progress=False)
    trained = []
    real = pipeline.train_baseline
    monkeypatch.setattr(pipeline, "train_baseline", lambda *a, **k: trained.append(1) or real(*a, **k))
    baseline_model(config, digits, tmp_path, progress=False)
    assert trained == []  # same code: reused
    import cpq_lib.artefacts as artefacts

    monkeypatch.setattr(artefacts, "code_fingerprint", lambda *parts: "changed")
    baseline_model(config, digits, tmp_path, progress=False)
    assert trained == [1]


def test_an_unfinished_baseline_of_other_settings_in_the_cache_is_started_over(digits, tmp_path):
    first = make_config("quick", {"train.epochs": 1, "train.lr": 0.02})
    baseline_model(first, digits, tmp_path, progress=False)
    folder = tmp_path / "baseline" / "seed-0"
    (folder / "model.pt").unlink()  # as if killed before the model was saved: only state.pt is left
    second = make_config("quick", {"train.epochs": 1})
    _, card = baseline_model(second, digits, tmp_path, progress=False)
    _, fresh = baseline_model(second, digits, tmp_path / "fresh", progress=False)
    assert card["history"][0]["train_loss"] == fresh["history"][0]["train_loss"] and card["train"]["lr"] == 0.05
    assert card["artefact_key"] == fresh["artefact_key"] and card["artefact_key"]["kind"] == "baseline"


def test_a_cached_baseline_of_another_precision_is_trained_again(digits, tmp_path):
    """A float32 baseline in the run folder must not stand in for the float64 one `quick` trains."""
    config = make_config("quick", {"train.epochs": 1})
    torch.set_default_dtype(torch.float32)  # the conftest fixture restores the session's precision
    model32, card32 = baseline_model(config, digits, tmp_path, progress=False)
    assert card32["dtype"] == "float32" and model32.classifier.weight.dtype == torch.float32
    torch.set_default_dtype(torch.float64)
    model64, card64 = baseline_model(config, digits, tmp_path, progress=False)
    assert card64["dtype"] == "float64" and model64.classifier.weight.dtype == torch.float64
    assert card64["history"] != card32["history"]  # trained again, in float64
    with torch.no_grad():  # and the data the loaders give is in the same precision
        images, _ = next(iter(digits.eval_loader("val")))
        assert images.dtype == torch.float64 and model64.eval()(images).dtype == torch.float64
