import json

import pytest
import torch

from cpq_lib.models import build_model
from cpq_lib.quant import BitPlan, BitPlanError, LayerBits, QuantConfig, quantize_, quantized_layers


@pytest.fixture()
def model():
    torch.manual_seed(0)
    return quantize_(build_model("resnet20", 10), QuantConfig(weight_bits=4, act_bits=4))


def test_read_apply_and_json_round_trip(model, tmp_path):
    plan = BitPlan.from_model(model, allocator="test")
    assert set(plan.layers) == {n for n, _ in quantized_layers(model)}
    assert plan.layers["layer1.0.conv1"].weight == [4] * 16 and plan.layers["layer1.0.conv1"].activation == 4
    plan.layers["layer3.2.conv2"].weight = [0, 1, 2, 3] * 16
    plan.layers["layer3.2.conv2"].activation = 2
    plan.apply_(model)
    layer = dict(quantized_layers(model))["layer3.2.conv2"]
    assert layer.weight_bits().tolist() == [0, 1, 2, 3] * 16 and layer.activation_bits() == 2
    assert BitPlan.from_model(model).layers == plan.layers
    path = tmp_path / "plan.json"
    plan.save(path)
    loaded = BitPlan.load(path)
    assert loaded.layers == plan.layers and loaded.meta == {"allocator": "test"}
    assert BitPlan.from_json(plan.to_json()).layers == plan.layers


def test_uniform_and_average_bits(model):
    plan = BitPlan.uniform(model, 3, 8)
    assert plan.average_weight_bits(model) == 3.0
    plan.layers["layer3.2.conv2"].weight = [0] * 64
    weights = {n: l.weight.numel() for n, l in quantized_layers(model)}
    expected = 3 * (sum(weights.values()) - weights["layer3.2.conv2"]) / sum(weights.values())
    assert plan.average_weight_bits(model) == pytest.approx(expected)


def test_validation_errors(model):
    plan = BitPlan.from_model(model)
    plan.layers["no.such.layer"] = LayerBits([4])
    with pytest.raises(BitPlanError, match="unknown layer\\(s\\) \\['no.such.layer'\\]"):
        plan.apply_(model)
    plan = BitPlan.from_model(model)
    plan.layers["layer1.0.conv1"].weight = [4] * 15
    with pytest.raises(BitPlanError, match="'layer1.0.conv1': 15 weight bit-widths for 16 output channels"):
        plan.validate(model)
    plan = BitPlan.from_model(model)
    del plan.layers["fc" if "fc" in plan.layers else "layer1.0.conv1"]
    with pytest.raises(BitPlanError, match="no entry"):
        plan.validate(model)


@pytest.mark.parametrize("bits,message", [([4, 17], "outside 0..16"), ([4, -1], "outside 0..16"), ([2.5], "integers, got 2.5"),
                                          (["4"], "integers"), ([True], "integers"), ("4444", "list")])
def test_bad_bit_values(bits, message):
    with pytest.raises(BitPlanError, match=message):
        LayerBits(bits)


def test_malformed_json():
    with pytest.raises(BitPlanError, match="malformed"):
        BitPlan.from_json("{not json")
    with pytest.raises(BitPlanError, match="format"):
        BitPlan.from_json(json.dumps({"layers": {}}))
    with pytest.raises(BitPlanError, match="unknown field"):
        BitPlan.from_json(json.dumps({"format": "cpq-bitplan/1", "layers": {"a": {"weight": [1], "bias": 3}}}))
    with pytest.raises(BitPlanError, match="a.weight\\[0\\]"):
        BitPlan.from_json(json.dumps({"format": "cpq-bitplan/1", "layers": {"a": {"weight": [99]}}}))


def test_meta_must_be_a_mapping():
    with pytest.raises(BitPlanError, match="'meta' must be a mapping.*list"):
        BitPlan.from_json(json.dumps({"format": "cpq-bitplan/1", "meta": [1, 2], "layers": {}}))
    with pytest.raises(BitPlanError, match="meta must be a mapping"):
        BitPlan({}, meta=["x"])


def test_plan_files_that_are_not_text_and_zero_bit_activations_are_refused(tmp_path):
    from cpq_lib.quant import QuantConfig

    binary = tmp_path / "plan.json"
    binary.write_bytes(b"\xff\xfe\x00plan")
    with pytest.raises(BitPlanError, match=r"plan.json is not UTF-8 text"):
        BitPlan.load(binary)
    with pytest.raises(BitPlanError, match="is a folder"):
        BitPlan.load(tmp_path)
    with pytest.raises(BitPlanError, match="activations take 1..16 bits, or null"):
        BitPlan.from_dict({"format": "cpq-bitplan/1", "layers": {"conv": {"weight": [2, 2], "activation": 0}}})
    with pytest.raises(ValueError, match="act_bits: 0 is not allowed"):
        QuantConfig(act_bits=0)
