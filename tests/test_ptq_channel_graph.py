"""Permutation-consistent reordering: channel spaces from the graph, physical permutations that keep the function."""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from torch import nn

from helpers import randomise_

from cpq_lib.models import build_model
from cpq_lib.ptq.channel_graph import channel_spaces
from cpq_lib.ptq.reorder import apply_space_permutation_, channel_ranges, permute_reorder_, space_order
from cpq_lib.quant import QuantConfig, quantize_
from cpq_lib.quant.quantizers import contiguous_groups
from cpq_lib.quant.transform import quantized_layers


def _randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    return randomise_(model, seed, biases=True).double()  # float64: a permutation only reorders sums, so outputs agree far below 1e-5


def _model(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)  # torchvision initialises from the global generator
    if name == "resnet20":
        return _randomise(build_model("resnet20", 10)), (1, 3, 32, 32)
    if name == "vgg_small":
        return _randomise(build_model("vgg_small", 10)), (1, 3, 32, 32)
    if name == "resnet18":
        return _randomise(torchvision.models.resnet18(num_classes=10)), (1, 3, 32, 32)
    return _randomise(torchvision.models.mobilenet_v2(num_classes=10)), (1, 3, 32, 32)


MODELS = ("resnet20", "resnet18", "mobilenet_v2", "vgg_small")
FIXED_ENDS = ("the model input", "the model output", "input_norm")


def _close(a: torch.Tensor, b: torch.Tensor, tolerance: float = 1e-9) -> bool:
    return float((a - b).abs().max()) <= tolerance * float(b.detach().abs().max())


@pytest.mark.parametrize("name", MODELS)
def test_random_permutation_of_every_space_keeps_the_float_function(name):
    model, shape = _model(name)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    reference = model(x)
    spaces = channel_spaces(model, x)
    fixed = [s for s in spaces if not s.permutable]
    # only the model's ends are fixed: the stem's input (image channels) and the classifier's output (classes)
    assert fixed and all(any(end in reason for end in FIXED_ENDS) for s in fixed for reason in s.fixed), [s.fixed for s in fixed]
    generator = torch.Generator().manual_seed(2)
    for space in spaces:
        if space.permutable:
            apply_space_permutation_(model, space, torch.randperm(space.channels, generator=generator))
    assert not _close(model.state_dict()[next(k for k in model.state_dict() if k.endswith("weight"))],
                      _model(name)[0].state_dict()[next(k for k in model.state_dict() if k.endswith("weight"))])
    assert _close(model(x), reference)


@pytest.mark.parametrize("name", MODELS)
def test_permute_reorder_blocks_everywhere_keeps_the_function_and_leaves_contiguous_blocks(name):
    """n_V x n_H = 4 x 2 on every layer (stem and classifier included): the raw weights are permuted exactly as
    the float network's consistent permutation is, which computes the same function to 1e-5."""
    model, shape = _model(name)
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    reference = model(x)
    config = QuantConfig(weight_bits=3, act_bits=None, granularity="block", blocks=(4, 2), exclude=())
    quantized = quantize_(copy.deepcopy(model), config).eval()
    plain_output = quantized(x).detach()
    table = permute_reorder_(quantized, x)
    float_copy = copy.deepcopy(model)
    permute_reorder_(float_copy, x)  # the same ranges, so the same permutations, on the float network
    assert _close(float_copy(x), reference)
    floats = dict(float_copy.named_modules())
    for layer_name, layer in quantized_layers(quantized):
        assert torch.equal(layer.weight, floats[layer_name].weight), layer_name
        q = layer.weight_quantizer
        assert q.blocks == (4, 2) or q.blocks[0] < 4  # (depthwise layers of fewer rows keep what fits)
        assert torch.equal(q.row_groups, contiguous_groups(q.row_groups.numel(), q.blocks[0]).to(q.row_groups.device))
        assert torch.equal(q.col_groups, contiguous_groups(q.col_groups.numel(), q.blocks[1]).to(q.col_groups.device))
    by_layer = table.set_index("layer")
    first, last = quantized_layers(quantized)[0][0], quantized_layers(quantized)[-1][0]
    assert not by_layer.loc[last, "rows_permuted"] and "the model output" in by_layer.loc[last, "kept_because"]
    assert not by_layer.loc[first, "columns_permuted"]
    inner = by_layer.drop(index=[first, last])
    assert inner["rows_permuted"].all() and inner["columns_permuted"].all()
    assert not _close(quantized(x), plain_output, 1e-3)  # the contiguous blocks now hold other channels


def test_followers_get_the_same_permutations():
    """The float reference of a scale search, permuted alike: with the stem and classifier left in float (the
    default), its own ranges would give other orders, yet every layer must match the quantized one channel by channel."""
    model, shape = _model("resnet20")
    x = torch.rand(*shape, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    reference = model(x)
    quantized = quantize_(copy.deepcopy(model), QuantConfig(weight_bits=3, act_bits=None, granularity="block", blocks=(4, 2)))
    follower = copy.deepcopy(model)
    permute_reorder_(quantized, x, followers=[follower])
    floats = dict(follower.named_modules())
    assert all(torch.equal(layer.weight, floats[name].weight) for name, layer in quantized_layers(quantized))
    assert _close(follower(x), reference)
    alone = copy.deepcopy(model)
    permute_reorder_(alone, x)  # ordered by the float network's own layers: not the same orders
    assert not torch.equal(alone.layer1[0].conv1.weight, follower.layer1[0].conv1.weight)


def test_residual_streams_share_one_space():
    model, shape = _model("resnet20")
    spaces = channel_spaces(model, torch.zeros(*shape, dtype=torch.float64))
    stream = next(s for s in spaces if "conv1" in s.rows)
    assert sorted(stream.rows) == ["conv1", "layer1.0.conv2", "layer1.1.conv2", "layer1.2.conv2"]
    assert sorted(stream.columns) == ["layer1.0.conv1", "layer1.1.conv1", "layer1.2.conv1", "layer2.0.conv1", "layer2.0.shortcut.0"]
    assert sorted(stream.norms) == ["bn1", "layer1.0.bn2", "layer1.1.bn2", "layer1.2.bn2"]
    torch.manual_seed(0)
    resnet18 = torchvision.models.resnet18(num_classes=10).eval()
    stage2 = next(s for s in channel_spaces(resnet18, torch.zeros(1, 3, 64, 64)) if "layer2.0.downsample.0" in s.rows)
    assert sorted(stage2.rows) == ["layer2.0.conv2", "layer2.0.downsample.0", "layer2.1.conv2"]
    mobilenet = torchvision.models.mobilenet_v2(num_classes=10).eval()
    depthwise = next(s for s in channel_spaces(mobilenet, torch.zeros(1, 3, 64, 64)) if "features.2.conv.1.0" in s.depthwise)
    assert depthwise.rows == ["features.2.conv.0.0"] and depthwise.columns == ["features.2.conv.2"]
    vgg = build_model("vgg_small", 10).eval()
    last = next(s for s in channel_spaces(vgg, torch.zeros(1, 3, 32, 32)) if "classifier" in s.columns)
    assert last.permutable and last.column_repeat == {"classifier": 16}  # 4 x 4 positions per channel after flatten


class _Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 8, 3, padding=1, groups=2)
        self.c = nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.relu(self.c(torch.relu(self.b(torch.relu(self.a(x)))))).mean((2, 3)))


def test_grouped_convolutions_keep_their_order_and_say_why():
    torch.manual_seed(0)
    model = _randomise(_Grouped())
    x = torch.rand(2, 3, 8, 8, dtype=torch.float64)
    reference = model(x)
    spaces = channel_spaces(model, x)
    grouped = [s for s in spaces if "b" in s.rows or "b" in s.columns]
    assert len(grouped) == 2 and all(not s.permutable and "grouped convolution b (groups=2" in s.fixed[0] for s in grouped)
    free = next(s for s in spaces if s.rows == ["c"])
    assert free.permutable and free.columns == ["fc"]  # mean over positions keeps channels
    quantized = quantize_(model, QuantConfig(weight_bits=4, act_bits=None, granularity="block", blocks=(2, 2), exclude=()))
    table = permute_reorder_(quantized, x).set_index("layer")
    assert "grouped convolution b" in table.loc["b", "kept_because"] and table.loc["c", "rows_permuted"]
    assert not table.loc["a", "rows_permuted"] and not table.loc["c", "columns_permuted"]
    assert reference.shape == quantized(x).shape


def test_a_space_sorted_by_its_producer_range_when_asked_for_rows():
    model, shape = _model("resnet20")
    x = torch.zeros(*shape, dtype=torch.float64)
    space = next(s for s in channel_spaces(model, x) if s.rows == ["layer2.1.conv1"])
    order = space_order(model, space, "rows")
    apply_space_permutation_(model, space, order)
    rows, _ = channel_ranges(dict(model.named_modules())["layer2.1.conv1"].weight)
    assert bool((rows[1:] >= rows[:-1]).all()) and not torch.equal(order, torch.arange(space.channels))


def test_bad_permutations_and_untraceable_models_are_refused():
    model, shape = _model("resnet20")
    spaces = channel_spaces(model, torch.zeros(*shape, dtype=torch.float64))
    free = next(s for s in spaces if s.permutable)
    with pytest.raises(ValueError, match=f"each of the {free.channels} channel indices exactly once"):
        apply_space_permutation_(model, free, torch.zeros(free.channels, dtype=torch.long))
    fixed = next(s for s in spaces if "the model output" in s.fixed)
    with pytest.raises(ValueError, match="may not be permuted: the model output"):
        apply_space_permutation_(model, fixed, torch.arange(fixed.channels))
    with pytest.raises(ValueError, match="side 'inputs' is not allowed"):
        space_order(model, free, "inputs")

    class Branchy(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)

        def forward(self, x):
            return self.conv(x) if x.sum() > 0 else x  # data-dependent control flow: fx cannot trace it

    with pytest.raises(ValueError, match="torch.fx cannot trace Branchy"):
        channel_spaces(Branchy(), torch.zeros(1, 3, 4, 4))
