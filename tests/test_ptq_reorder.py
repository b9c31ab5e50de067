"""Channel reordering: physical permutations keep the function; index groups equal permutation + contiguous blocks."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from helpers import randomise_

from cpq_lib.models import build_model
from cpq_lib.ptq.reorder import channel_ranges, permute_channels_, reorder_channels_, reorder_groups
from cpq_lib.quant import QuantConfig, quantize_


def _randomise_bn(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_(model, seed)


def _resnet20():
    torch.manual_seed(0)  # torchvision initialises from the global generator
    model = _randomise_bn(build_model("resnet20", 10))
    m = dict(model.named_modules())
    return model, "layer2.1.conv1", [m["layer2.1.conv1"], m["layer2.1.bn1"]], [m["layer2.1.conv2"]], (1, 3, 32, 32)


def _resnet18():
    torch.manual_seed(0)  # torchvision initialises from the global generator
    model = _randomise_bn(torchvision.models.resnet18(num_classes=10))
    m = dict(model.named_modules())
    return model, "layer3.0.conv1", [m["layer3.0.conv1"], m["layer3.0.bn1"]], [m["layer3.0.conv2"]], (1, 3, 64, 64)


def _mobilenet_v2():
    torch.manual_seed(0)  # torchvision initialises from the global generator
    model = _randomise_bn(torchvision.models.mobilenet_v2(num_classes=10))
    m = dict(model.named_modules())
    block = "features.3.conv"  # expand 1x1 -> BN -> ReLU6 -> depthwise 3x3 -> BN -> ReLU6 -> project 1x1
    producers = [m[f"{block}.0.0"], m[f"{block}.0.1"], m[f"{block}.1.0"], m[f"{block}.1.1"]]
    return model, f"{block}.0.0", producers, [m[f"{block}.2"]], (1, 3, 64, 64)


MODELS = {"resnet20": _resnet20, "resnet18": _resnet18, "mobilenet_v2": _mobilenet_v2}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_physical_permutation_keeps_the_float_function(name):
    model, layer, producers, consumers, shape = MODELS[name]()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(1)) * 2
    reference = model(x)
    rows, _ = channel_ranges(dict(model.named_modules())[layer].weight)
    permute_channels_(torch.argsort(rows), producers, consumers)
    assert not torch.equal(dict(model.named_modules())[layer].weight.amax((1, 2, 3)), rows)  # really permuted
    torch.testing.assert_close(model(x), reference, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_index_reordering_equals_permutation_plus_contiguous_blocks(name):
    """The reordered (index-grouped) quantized model computes what the physically permuted one does with plain blocks."""
    model, layer, producers, consumers, shape = MODELS[name]()
    x = torch.randn(*shape, generator=torch.Generator().manual_seed(2)) * 2
    float_output = model(x)
    config = QuantConfig(weight_bits=3, act_bits=None, granularity="block", blocks=(4, 1), exclude=())
    indexed = quantize_(copy.deepcopy(model), config)
    before = {k: v.clone() for k, v in indexed.state_dict().items() if not (".weight_quantizer." in k)}
    plain_weight = dict(indexed.named_modules())[layer].quantized_weight().detach().clone()
    table = reorder_channels_(indexed, "index_sort", layers=[layer])
    assert bool(table["rows_regrouped"].iloc[0]) and table["row_spread_after"].iloc[0] < table["row_spread_before"].iloc[0]
    after = {k: v for k, v in indexed.state_dict().items() if not (".weight_quantizer." in k)}
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)  # weights untouched
    permuted = copy.deepcopy(model)
    modules = dict(permuted.named_modules())
    rows, _ = channel_ranges(modules[layer].weight)
    names = {id(m): n for n, m in model.named_modules()}
    permute_channels_(torch.argsort(rows, stable=True), [modules[names[id(p)]] for p in producers],
                      [modules[names[id(c)]] for c in consumers])
    torch.testing.assert_close(permuted(x), float_output, rtol=1e-4, atol=1e-4)
    physical = quantize_(permuted, config)
    reordered_output = indexed(x)
    torch.testing.assert_close(reordered_output, physical(x), rtol=1e-4, atol=1e-4)
    reordered_weight = dict(indexed.named_modules())[layer].quantized_weight()
    assert (reordered_weight - plain_weight).abs().max() > 1e-3  # the regrouping changed the quantization


def test_sort_groups_hold_neighbouring_ranges_and_kmeans_follows_gaps():
    weight = torch.ones(8, 2, 1, 1) * torch.tensor([5.0, 0.1, 4.0, 0.2, 6.0, 0.3, 0.11, 7.0]).view(8, 1, 1, 1)
    rows, cols, _ = reorder_groups(weight, (2, 1), "index_sort")
    assert rows.tolist() == [1, 0, 1, 0, 1, 0, 0, 1]
    uneven = torch.tensor([1.0, 1.1, 1.2, 1.05, 1.15, 1.12, 1.01, 50.0]).view(8, 1, 1, 1).expand(8, 2, 1, 1)
    assert reorder_groups(uneven, (2, 1), "index_sort")[0].tolist().count(1) == 4
    assert reorder_groups(uneven, (2, 1), "index_kmeans")[0].tolist() == [0, 0, 0, 0, 0, 0, 0, 1]  # the outlier alone


def test_columns_grouped_by_input_channel():
    weight = torch.ones(4, 6, 3, 3) * torch.tensor([1.0, 9.0, 2.0, 8.0, 3.0, 7.0]).view(1, 6, 1, 1)
    _, cols, regrouped = reorder_groups(weight, (2, 2), "index_sort")
    assert regrouped and cols.view(6, 9).unique(dim=1).shape[1] == 1  # a channel's 9 columns share a group
    assert cols.view(6, 9)[:, 0].tolist() == [0, 1, 0, 1, 0, 1]


def test_bad_reordering_inputs_get_clear_errors():
    weight = torch.randn(4, 3, 3, 3)
    with pytest.raises(ValueError, match="reorder method .cluster."):
        reorder_groups(weight, (2, 1), "cluster")
    with pytest.raises(ValueError, match="output groups must be in 1..4, got 5"):
        reorder_groups(weight, (5, 1))
    with pytest.raises(ValueError, match="every channel index exactly once"):
        permute_channels_([0, 0, 1, 2], [nn.Conv2d(3, 4, 1)], [])
    model = quantize_(build_model("digits_cnn", 10), QuantConfig(granularity="block", blocks=(2, 2)))
    with pytest.raises(ValueError, match="no quantized layer"):
        reorder_channels_(model, layers=["stem.0"])


def test_reordered_searched_model_exports_and_keeps_its_bit_plan(tmp_path, digits_baseline, digits):
    from cpq_lib.ptq import ScaleSearchConfig, search_scales_
    from cpq_lib.quant import BitPlan, calibrate_, export_packed, import_packed

    model, _ = digits_baseline
    config = QuantConfig(weight_bits=4, act_bits=4, granularity="block", blocks=(4, 2))
    quantized = quantize_(copy.deepcopy(model), config).eval()
    plan = BitPlan.from_model(quantized)
    reorder_channels_(quantized, "index_kmeans")
    calibration = list(digits.calibration_loader(64, seed=0))
    calibrate_(quantized, calibration)
    search_scales_(quantized, model, calibration, ScaleSearchConfig(steps=10, rounds=1, positions=256), progress=False)
    assert BitPlan.from_model(quantized).to_dict() == plan.to_dict()
    export_packed(quantized, tmp_path / "model.cpq")
    fresh = quantize_(copy.deepcopy(model), config).eval()
    import_packed(fresh, tmp_path / "model.cpq")
    x = next(iter(digits.eval_loader("val", batch_size=32)))[0]
    with torch.no_grad():
        assert torch.equal(fresh(x), quantized(x))
    layer = dict(fresh.named_modules())["features.0.0"].weight_quantizer
    assert not torch.equal(layer.row_groups, torch.arange(32) * 4 // 32)  # the reordered groups came back
