import copy

import pytest
import torch

from cpq_lib.classpath import critical_paths, layer_sensitivity, path_sensitivity, score_classes, sensitivity
from cpq_lib.quant import BitPlan, QuantConfig, quantize_, quantized_layers


@pytest.fixture(scope="module")
def setup(digits_baseline):
    model = digits_baseline[0]
    quantized = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=8, act_bits=None))
    return model, quantized


def test_layer_sensitivity_table(setup, digits):
    _, quantized = setup
    table = layer_sensitivity(quantized, digits, bits=[0, 8], progress=False)
    assert set(table["unit"]) == {n for n, _ in quantized_layers(quantized)} and len(table) == 4
    at_reference = table[table["bits"] == 8]
    assert (at_reference["accuracy_drop"] == 0).all() and (at_reference["loss_rise"] == 0).all()
    pruned = table[table["bits"] == 0]
    assert (pruned["accuracy_drop"] > 0.3).all()  # a whole layer at 0 bits destroys the model
    # the model is left at its reference plan
    assert all(l.weight_bits().eq(8).all() for _, l in quantized_layers(quantized))


def test_path_sensitivity_lowers_only_path_channels(setup, digits, monkeypatch):
    model, quantized = setup
    loader = digits.per_class_loader(10, split="train", seed=0)
    scores = score_classes(model, loader, 10, digits.classes, progress=False)
    paths = critical_paths(scores, sparsity=0.7)
    evaluated = []  # the bits the model held at each evaluation
    original = sensitivity._evaluate
    monkeypatch.setattr(sensitivity, "_evaluate", lambda m, *a: (evaluated.append(BitPlan.from_model(m)), original(m, *a))[1])
    table = path_sensitivity(quantized, digits, paths, bits=[0], classes=["3", "7"], progress=False)
    assert len(evaluated) == 3  # the reference, then class 3, then class 7
    for plan, class_index in zip(evaluated[1:], (3, 7)):
        for name, layer_bits in plan.layers.items():
            bits = torch.tensor(layer_bits.weight)
            on_path = paths.masks[name][class_index]
            assert (bits[on_path] == 0).all(), name          # the class's channels are lowered
            assert (bits[~on_path] == 8).all(), name         # every other channel keeps its reference bits
            assert on_path.any() and (~on_path).any()
    assert list(table["unit"]) == ["3", "7"]
    expected = sum(int(paths.masks[n][3].sum()) for n, _ in quantized_layers(quantized))
    assert table.iloc[0]["channels"] == expected
    assert (table["accuracy_drop"] > 0).all()
    assert BitPlan.from_model(quantized).layers == BitPlan.uniform(quantized, 8, None).layers
