"""The shift-and-add executor runs a whole focused model from its codes and agrees with the fake-quantized model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from cpq_lib.models import build_model
from cpq_lib.models.pretrained import load_pretrained
from cpq_lib.quant import calibrate_
from cpq_lib.sparse import magnitude_prune_
from cpq_lib.sparse.executor import ShiftAddExecutor, quantize_focused_inputs_
from cpq_lib.sparse.shift import shift_add_conv2d, shift_add_linear
from cpq_lib.sparse.transform import focus_quantize_, focused_layers, set_fraction_


def _focused_resnet20(levels: str = "paper", dtype: torch.dtype = torch.float32) -> nn.Module:
    """The shipped ResNet-20, 70% pruned, focused 5-bit weights, 8-bit inputs calibrated on 16 images."""
    model, _ = load_pretrained("resnet20", "cifar10")
    model = model.eval().to(dtype)
    magnitude_prune_(model, 0.7, exclude=("conv1", "fc"))
    focus_quantize_(model, bits=5, levels=levels)
    quantize_focused_inputs_(model, bits=8)
    images = torch.rand(16, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=dtype)
    calibrate_(model, [(images, torch.zeros(16, dtype=torch.long))])
    return model


def _exact_input_grids_(model: nn.Module) -> None:
    """Input quantizers computing k * s in float64 (torch's fake quantization rounds k * s to float32)."""
    for _, module, _ in focused_layers(model):
        quantizer = module.input_quantizer
        qmin, qmax = quantizer._grid()
        step = float(quantizer.scale)
        quantizer.forward = lambda x, step=step, qmin=qmin, qmax=qmax: torch.clamp(torch.round(x / step), qmin, qmax) * step


def _layer_inputs(model: nn.Module, run, x: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Each focused layer's input codes (after its input quantizer) during ``run(x)``, and the output."""
    seen, handles = {}, []
    for name, module, _ in focused_layers(model):
        step = float(module.input_quantizer.scale)
        handles.append(module.register_forward_pre_hook(
            lambda mod, args, name=name, step=step: seen.__setitem__(name, torch.round(args[0] / step).long())))
    try:
        output = run(x)
    finally:
        for handle in handles:
            handle.remove()
    return seen, output


def test_each_layer_from_codes_equals_the_fake_quantized_layer():
    """Layer by layer on the model's own inputs: the integer sums give the fake-quantized layer's output to
    float32 rounding (the log2 level set: tests/test_sparse_focused.py's convolution test)."""
    model = _focused_resnet20()
    x = torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    executor = ShiftAddExecutor(model)
    assert len(executor.layers) == 20  # 18 block convolutions and 2 projection shortcuts (stem and classifier float)
    seen = {}
    handles = [module.register_forward_hook(lambda mod, args, out: seen.__setitem__(mod, (args[0], out)))
               for module, _ in executor.layers]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    for module, state in executor.layers:
        inputs, output = seen[module]
        torch.testing.assert_close(ShiftAddExecutor._forward(module, state, inputs), output, rtol=1e-5,
                                   atol=1e-5 * float(output.abs().max()))


def test_the_whole_resnet20_from_codes_equals_the_fake_quantized_model():
    """End to end, against the fake-quantized model in float64 with exact input grids: the same integer input
    codes in every layer and the same logits. (In float32, torch's fake quantization rounds k * s to float32,
    which now and then puts a value on a rounding boundary one layer on: those codes move a step.)"""
    model = _focused_resnet20(dtype=torch.float64)
    _exact_input_grids_(model)
    x = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    reference_codes, reference = _layer_inputs(model, lambda v: model(v).detach(), x)
    codes, logits = _layer_inputs(model, ShiftAddExecutor(model), x)
    assert reference_codes.keys() == codes.keys() and len(codes) == 20
    for name, expected in reference_codes.items():
        assert torch.equal(codes[name], expected), name
    torch.testing.assert_close(logits, reference, rtol=1e-9, atol=1e-9)


def test_grouped_convolution_and_linear_from_codes():
    from cpq_lib.sparse.focused import plan_layer, quantize_levels

    generator = torch.Generator().manual_seed(3)
    weight = torch.randn(8, 2, 3, 3, generator=generator, dtype=torch.float64)  # groups=4: 8 inputs, 2 per group
    weight.view(-1)[::4] = 0.0
    layout, _, component = plan_layer(weight, bits=5)
    codes, levels = quantize_levels(weight, layout, component)
    x_int = torch.randint(-127, 128, (2, 8, 6, 6), generator=generator)
    reference = F.conv2d(x_int.double() * 0.02, 0.9 * levels, padding=1, groups=4)
    torch.testing.assert_close(shift_add_conv2d(x_int, 0.02, codes, layout, 0.9, padding=1, groups=4), reference, rtol=1e-12, atol=1e-12)
    dense = torch.randn(5, 12, generator=generator, dtype=torch.float64)
    layout, _, component = plan_layer(dense, bits=4)
    codes, levels = quantize_levels(dense, layout, component)
    x_int = torch.randint(0, 256, (3, 12), generator=generator)
    torch.testing.assert_close(shift_add_linear(x_int, 0.1, codes, layout, 1.3), F.linear(x_int.double() * 0.1, 1.3 * levels),
                               rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="groups=3 do not fit an input of 8 channels"):
        shift_add_conv2d(torch.zeros(1, 8, 4, 4, dtype=torch.long), 1.0, torch.zeros(6, 2, 1, 1, dtype=torch.long), layout, 1.0, groups=3)


def test_executor_refuses_what_it_cannot_run():
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10).eval()
    magnitude_prune_(model, 0.5, exclude=("stem*", "classifier"))
    focus_quantize_(model, bits=5)
    with pytest.raises(ValueError, match="needs integer inputs: quantize_focused_inputs_"):
        ShiftAddExecutor(model)
    quantize_focused_inputs_(model)
    calibrate_(model, [(torch.rand(4, 1, 8, 8), torch.zeros(4, dtype=torch.long))])
    set_fraction_(model, 0.5)
    with pytest.raises(ValueError, match=r"not every weight is held at its level \(set_fraction_\(model, 1.0\)"):
        ShiftAddExecutor(model)
    set_fraction_(model, 1.0)
    x = torch.rand(3, 1, 8, 8)
    assert torch.equal(ShiftAddExecutor(model)(x).argmax(1), model(x).argmax(1))
    with pytest.raises(ValueError, match="no focused layers"):
        quantize_focused_inputs_(build_model("digits_cnn", 10))
