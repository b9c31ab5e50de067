import pytest
import torch
from torch import nn

from cpq_lib.models import build_model
from cpq_lib.quant import QuantConfig, layer_table, model_size_bits, model_summary, quantize_, quantized_layers


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 3, 1)  # kept in full precision (@first)
        self.conv = nn.Conv2d(3, 2, 3, padding=1, bias=True)
        self.bn = nn.BatchNorm2d(2)
        self.head = nn.Linear(32, 4)  # kept in full precision (@last)

    def forward(self, x):
        return self.head(self.bn(self.conv(torch.relu(self.stem(x)))).flatten(1))


def test_size_formula_on_a_hand_computed_layer():
    model = quantize_(Tiny(), QuantConfig(weight_bits=4, act_bits=8))
    layer = dict(quantized_layers(model))["conv"]
    layer.weight_quantizer.set_bits(torch.tensor([2, 4]), layer.weight)
    table = layer_table(model, torch.rand(1, 1, 4, 4))
    # conv: 2 channels x 27 weights at 2 and 4 bits = 162; bit table 2 x 8 = 16; 2 scales x 32 = 64;
    # bias 2 x 32 = 64; input quantizer: scale 32 + bits/sign 16 = 48  ->  354 bits
    assert table.loc["conv", "bytes"] == 354 / 8
    # MACs: 4x4 outputs x 27 per channel x 2 channels; BitOPs: per channel MACs x w bits x 8 activation bits
    assert table.loc["conv", "macs"] == 16 * 27 * 2
    assert table.loc["conv", "bitops"] == 16 * 27 * (2 + 4) * 8
    assert table.loc["conv", "weight_bits"] == 3.0
    # the rest at 32 bits: stem (3 + 3), BN (4 x 2), head (128 + 4)
    assert model_size_bits(model) == 354 + 32 * (6 + 8 + 132)
    summary = model_summary(model, torch.rand(1, 1, 4, 4))
    assert summary["avg_weight_bits"] == 3.0
    assert summary["avg_weight_bits_all_layers"] == pytest.approx((3 * 54 + 32 * (3 + 128)) / (54 + 3 + 128))
    float_bits = 32 * (6 + 54 + 2 + 8 + 132)
    assert summary["compression_ratio"] == pytest.approx(float_bits / model_size_bits(model))
    assert table.loc["stem", "bitops"] == 16 * 3 * 32 * 32 and not table.loc["head", "quantized"]


def test_resnet20_summary_is_consistent():
    model = quantize_(build_model("resnet20", 10), QuantConfig(weight_bits=2, act_bits=2))
    summary = model_summary(model, torch.rand(1, 3, 32, 32))
    assert summary["avg_weight_bits"] == 2.0 and summary["avg_act_bits"] == 2.0
    assert summary["quantized_layers"] == 18 and summary["float_layers"] == 4
    assert summary["macs"] == 40_813_184
    assert 8 < summary["compression_ratio"] < 16


class Mixed(nn.Module):
    """Conv1d and ConvTranspose2d stay float; a Linear is called twice; another is never called."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 4, 3, padding=1, bias=False)
        self.up = nn.ConvTranspose2d(4, 2, 2, stride=2, bias=False)
        self.seq = nn.Conv1d(2, 3, 3, padding=1, bias=False)
        self.twice = nn.Linear(3, 3, bias=False)
        self.unused = nn.Linear(3, 3, bias=False)

    def forward(self, x):  # x: (B, 2, 4, 4)
        y = self.up(self.conv(x))                      # (B, 2, 8, 8)
        z = self.seq(y.flatten(2)).mean(2)              # (B, 3)
        return self.twice(self.twice(z))


def test_every_compute_layer_is_counted_by_call():
    model = quantize_(Mixed(), QuantConfig(weight_bits=4, act_bits=None, exclude=("up", "seq")))
    table = layer_table(model, torch.rand(1, 2, 4, 4))
    assert list(table.index) == ["conv", "up", "seq", "twice", "unused"]
    assert table.loc["conv", "macs"] == 16 * 18 * 4
    assert table.loc["up", "macs"] == 16 * (4 * 2 * 2 * 2) and not table.loc["up", "quantized"]  # input positions x weight
    assert table.loc["seq", "macs"] == 64 * 18 and table.loc["seq", "type"] == "Conv1d"
    assert table.loc["twice", "calls"] == 2 and table.loc["twice", "macs"] == 2 * 9
    assert table.loc["twice", "bitops"] == 2 * 9 * 4 * 32
    assert table.loc["unused", "calls"] == 0 and table.loc["unused", "macs"] == 0
    summary = model_summary(model, torch.rand(1, 2, 4, 4))
    assert summary["float_layers"] == 2 and summary["quantized_layers"] == 3
    assert summary["macs"] == 16 * 18 * 4 + 16 * 32 + 64 * 18 + 18
