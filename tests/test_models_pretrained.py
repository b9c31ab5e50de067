"""The shipped ResNet-20 (CIFAR-10): loads safely and reproduces its model card on the JPEG test split."""

import json

import pytest

from cpq_lib.models import available_pretrained, load_pretrained, pretrained_card, pretrained_path
from cpq_lib.pipeline import check_card_matches
from cpq_lib.train import evaluate


def test_resnet20_cifar10_ships_with_a_complete_card():
    assert ("resnet20", "cifar10") in available_pretrained()
    card = pretrained_card("resnet20", "cifar10")
    for key in ("model", "model_kwargs", "data", "seed", "epochs", "train", "val_accuracy", "test_accuracy",
                "per_class_test_accuracy", "wall_time_seconds", "command", "environment"):
        assert key in card, key
    assert card["data"]["source"]["sha256"] == "b6b511e9239d6581439046dbb5f862ddd8e8a8ee1748811ecd980d8205700159"
    assert card["data"]["sizes"] == {"train": 45_000, "val": 5_000, "test": 10_000}
    assert card["test_accuracy"] > 0.85
    assert pretrained_path("resnet20", "cifar10").stat().st_size < 2_000_000
    model, embedded = load_pretrained("resnet20", "cifar10")
    assert json.loads(json.dumps(embedded)) == card  # the JSON card is the one inside the checkpoint


def test_reproduces_card_accuracy_on_the_full_test_split(cifar10):
    model, card = load_pretrained("resnet20", "cifar10")
    check_card_matches(card, cifar10, "shipped resnet20")  # same validation split it was trained without
    result = evaluate(model, cifar10.eval_loader("test"), cifar10.num_classes)
    assert result.count == 10_000
    assert result.accuracy == pytest.approx(card["test_accuracy"], abs=0.002)
