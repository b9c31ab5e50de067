"""Run a whole focused model from its integer codes with shift-and-add arithmetic: the deployable form.

Focused levels turn every multiplication by a weight into a shift (:mod:`.shift`); that needs integer
inputs, so each focused layer first gets a per-tensor activation quantizer
(:func:`quantize_focused_inputs_`, the paper's 8-bit activations; calibrate it with
:func:`cpq_lib.quant.calibrate_` on training images). :class:`ShiftAddExecutor` then runs the model
with every focused Conv2d (groups included) and Linear computed from its codes: integer input codes,
per-component shift-and-add sums, two multiplications per output and component, the bias; every other
module (stem and classifier in float, BatchNorm, pooling) runs as it is. Its logits equal the
fake-quantized model's to float rounding (tested on ResNet-20). It is a reference executor for
checking that the codes alone define the network, not a fast kernel: ``benchmarks/bench_shift.py``
measures how it compares with the float model on this machine.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Iterator

import torch
from torch import nn

from ..quant.quantizers import ActivationQuantizer
from .shift import shift_add_conv2d, shift_add_linear
from .transform import focused_layers


def _quantize_layer_input(module: nn.Module, args: tuple) -> tuple:
    return (module.input_quantizer(args[0]), *args[1:])


def quantize_focused_inputs_(model: nn.Module, bits: int = 8) -> list[str]:
    """Give every focused layer a per-tensor input quantizer of ``bits`` (signed or not, decided at
    calibration), applied before the layer; returns the layers' names. Call again after rebuilding a model
    from a state dict (the quantizers' state is in it, the hooks are not)."""
    names = []
    for name, module, _ in focused_layers(model):
        if not isinstance(getattr(module, "input_quantizer", None), ActivationQuantizer):
            module.input_quantizer = ActivationQuantizer(bits)
            module.register_forward_pre_hook(_quantize_layer_input)
        names.append(name)
    if not names:
        raise ValueError("no focused layers: call focus_quantize_ first")
    return names


class ShiftAddExecutor:
    """Calls ``model`` with every focused layer computed from its codes by integer shift-and-add sums."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.layers: list[tuple[nn.Module, dict]] = []
        with torch.no_grad():
            for name, module, param in focused_layers(model):
                quantizer = param.weight_quantizer
                if not bool(quantizer.held[param.keep.bool()].all()):
                    raise ValueError(f"layer {name!r}: not every weight is held at its level (set_fraction_(model, 1.0) first)")
                inputs = getattr(module, "input_quantizer", None)
                if not isinstance(inputs, ActivationQuantizer) or not inputs.enabled or not bool(inputs.initialized) \
                        or not inputs.symmetric or int(inputs.bits) < 2:
                    raise ValueError(f"layer {name!r}: shift-and-add needs integer inputs: quantize_focused_inputs_(model) "
                                     "and calibrate_ it on training images first")
                if isinstance(module, nn.Conv2d) and (module.padding_mode != "zeros" or isinstance(module.padding, str)):
                    raise ValueError(f"layer {name!r}: zero padding with explicit sizes only, got {module.padding!r}")
                latent = module.parametrizations.weight.original * param.keep
                self.layers.append((module, {"codes": quantizer.codes(latent).cpu(), "layout": quantizer.layout,
                                             "alpha": float(quantizer.alpha), "inputs": inputs}))

    @staticmethod
    def _forward(module: nn.Module, state: dict, x: torch.Tensor) -> torch.Tensor:
        step = float(state["inputs"].scale)
        x_int = torch.round(x.detach().double().cpu() / step).long()  # the input quantizer's codes (x is on its grid)
        if isinstance(module, nn.Conv2d):
            out = shift_add_conv2d(x_int, step, state["codes"], state["layout"], state["alpha"], module.stride,
                                   module.padding, module.dilation, module.groups)
            shape = (1, -1, 1, 1)
        else:
            out = shift_add_linear(x_int, step, state["codes"], state["layout"], state["alpha"])
            shape = (1, -1)
        if module.bias is not None:
            out = out + module.bias.detach().double().cpu().view(shape)
        return out.to(device=x.device, dtype=x.dtype)

    @contextlib.contextmanager
    def _patched(self) -> Iterator[None]:
        for module, state in self.layers:
            module.forward = functools.partial(self._forward, module, state)
        try:
            yield
        finally:
            for module, _ in self.layers:
                del module.forward

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        was_training = self.model.training
        self.model.eval()
        try:
            with self._patched():
                return self.model(x)
        finally:
            self.model.train(was_training)
