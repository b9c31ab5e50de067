import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpq_lib.quant import ActivationQuantizer, QConv2d, QLinear, WeightQuantizer


@pytest.mark.parametrize("groups,bias", [(1, True), (1, False), (2, True), (8, False)])
def test_qconv_matches_float_conv_on_quantized_operands(groups, bias):
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 16, 3, stride=2, padding=1, groups=groups, bias=bias)
    layer = QConv2d.from_float(conv, WeightQuantizer(conv.weight.shape, 4), ActivationQuantizer(6))
    assert layer.weight is conv.weight and (layer.bias is conv.bias)
    x = torch.rand(2, 8, 9, 9)
    out = layer(x)
    expected = F.conv2d(layer.input_quantizer(x), layer.weight_quantizer(conv.weight), conv.bias, 2, 1, 1, groups)
    assert torch.equal(out, expected) and out.shape == (2, 16, 5, 5)
    assert layer.weight_bits().tolist() == [4] * 16 and layer.activation_bits() == 6


def test_qlinear_on_flat_and_sequence_inputs():
    torch.manual_seed(0)
    linear = nn.Linear(12, 5)
    layer = QLinear.from_float(linear, WeightQuantizer(linear.weight.shape, 3), None)
    x = torch.randn(4, 7, 12)
    assert torch.equal(layer(x), F.linear(x, layer.weight_quantizer(linear.weight), linear.bias))
    assert layer.activation_bits() is None and layer.params_per_channel() == 12


def test_gradients_reach_weights_and_inputs():
    conv = nn.Conv2d(3, 4, 3)
    layer = QConv2d.from_float(conv, WeightQuantizer(conv.weight.shape, 4), ActivationQuantizer(4))
    x = torch.rand(2, 3, 6, 6, requires_grad=True)
    layer(x).sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0
    assert x.grad is not None and x.grad.abs().sum() > 0
