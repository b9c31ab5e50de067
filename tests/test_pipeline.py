import pytest
import torch

from cpq_lib.config import make_config
from cpq_lib.data import load_dataset
from cpq_lib.errors import CheckpointError
from cpq_lib.pipeline import baseline_model, check_card_matches


def test_baseline_is_trained_once_then_reused(digits, tmp_path):
    config = make_config("quick", {"train.epochs": 2})
    model, card = baseline_model(config, digits, tmp_path, progress=False)
    assert card["epochs"] == 2 and (tmp_path / "baseline" / "model.pt").is_file()
    assert 0.0 <= card["test_accuracy"] <= 1.0 and set(card["per_class_test_accuracy"]) == set(digits.classes)
    again, card_again = baseline_model(config, digits, tmp_path, progress=False)
    assert card_again["history"] == card["history"]
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), again.state_dict().values()))


def test_card_must_match_split_and_classes(digits):
    card = {"data": digits.describe()}
    check_card_matches(card, digits, "here")
    with pytest.raises(CheckpointError, match="another validation split"):
        check_card_matches(card, load_dataset("digits", split_seed=4), "here")
    card["data"]["classes"] = list("abcdefghij")
    with pytest.raises(CheckpointError, match="class mismatch"):
        check_card_matches(card, digits, "here")
