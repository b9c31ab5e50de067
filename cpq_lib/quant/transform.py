"""Config-driven model transforms: ``quantize_(model, config)``, BN folding, calibration, undo.

Nothing here knows a model's name or layer indices: every Conv2d/Linear is replaced unless its module
name matches an ``exclude`` pattern (``fnmatch`` style) or a positional token: ``@first`` / ``@last``
are the first / last Conv2d-or-Linear in registration order (the stem and the classifier of
torchvision-style CNNs).
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Iterable

import torch
from torch import nn
from torch.nn.utils import parametrize

from ..devices import check_model_device
from .modules import QConv2d, QuantizedLayer, QuantizedSubclass, quantized_twin
from .quantizers import GRANULARITIES, SCALE_INITS, WEIGHT_GRIDS, ActivationQuantizer, WeightQuantizer, check_bits

DEFAULT_EXCLUDE = ("@first", "@last", "*shortcut*", "*downsample*")


@dataclass
class QuantConfig:
    """How to quantize a model. ``act_bits=None`` leaves activations in full precision."""

    weight_bits: int = 8
    act_bits: int | None = 8
    granularity: str = "channel"           # tensor | channel | block
    blocks: tuple[int, int] | None = None  # (output groups, input groups) for granularity "block"
    symmetric: bool = True
    weight_init: str = "max"               # max | mse
    weight_grid: str = "narrow"            # narrow [-(2^(b-1)-1), 2^(b-1)-1] | full [-2^(b-1), 2^(b-1)-1] (LSQ)
    act_init: str = "max"                  # max | mse
    act_signed: bool | None = None         # None: decided by calibration (unsigned after ReLU)
    learnable_scales: bool = False         # LSQ-style learnable step sizes
    fold_bn: bool = False                  # fold BatchNorm2d into the preceding conv first (eval-mode models)
    exclude: tuple[str, ...] = field(default_factory=lambda: DEFAULT_EXCLUDE)

    def __post_init__(self) -> None:
        check_bits(self.weight_bits, "weight_bits")
        if self.act_bits is not None:
            check_bits(self.act_bits, "act_bits")
            if self.act_bits < 1:
                raise ValueError(f"act_bits: {self.act_bits} is not allowed; activations take 1..16 bits, or None for full precision")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity: {self.granularity!r} is not allowed; choose one of {list(GRANULARITIES)}")
        if self.granularity == "block" and (self.blocks is None or len(self.blocks) != 2 or min(self.blocks) < 1):
            raise ValueError(f"blocks: granularity 'block' needs two positive group counts, got {self.blocks!r}")
        if self.weight_grid not in WEIGHT_GRIDS:
            raise ValueError(f"weight_grid: {self.weight_grid!r} is not allowed; choose one of {list(WEIGHT_GRIDS)}")
        for name in ("weight_init", "act_init"):
            if getattr(self, name) not in SCALE_INITS:
                raise ValueError(f"{name}: {getattr(self, name)!r} is not allowed; choose one of {list(SCALE_INITS)}")
        self.exclude = tuple(self.exclude)


# modules that compute with their children's weights without calling the children
READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer, nn.TransformerDecoderLayer)


def weights_read_directly(model: nn.Module) -> set[str]:
    """Conv2d/Linear layers whose parent reads their weight without calling them.

    ``nn.MultiheadAttention`` passes ``out_proj.weight`` to ``F.multi_head_attention_forward``, and
    ``nn.TransformerEncoderLayer`` (decoder too) runs a fused inference path on ``linear1``/``linear2``
    weights: a quantized twin would not run, so the plan would claim bits the forward does not use.
    Such layers stay in full precision (their parameters count in the float part of the model size).
    Blocks built from plain modules (torchvision's ViT MLP) are quantized as usual.
    """
    names = set()
    for parent_name, parent in model.named_modules():
        if isinstance(parent, READS_CHILD_WEIGHTS):
            names.update(f"{parent_name}.{child}" if parent_name else child
                         for child, module in parent.named_modules() if child and isinstance(module, (nn.Conv2d, nn.Linear)))
    return names


def quantizable_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every Conv2d / Linear (quantized or not) that runs as a module, with its name, in registration order.

    A module registered under several names (``self.b = self.a``) appears once, under its first name.
    """
    direct = weights_read_directly(model)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Conv2d, nn.Linear)) and name not in direct]


def quantized_layers(model: nn.Module) -> list[tuple[str, QuantizedLayer]]:
    return [(name, module) for name, module in model.named_modules() if isinstance(module, QuantizedLayer)]


def excluded_names(model: nn.Module, patterns: Iterable[str]) -> set[str]:
    """Names of the Conv2d/Linear layers that ``patterns`` keep in full precision."""
    names = [name for name, _ in quantizable_layers(model)]
    chosen: set[str] = set()
    for pattern in patterns:
        if pattern in ("@first", "@last"):
            if names:  # a model without Conv2d/Linear layers has no first or last one
                chosen.add(names[0] if pattern == "@first" else names[-1])
        elif pattern.startswith("@"):
            raise ValueError(f"unknown exclude token {pattern!r}; allowed: @first, @last or an fnmatch pattern")
        else:
            chosen.update(n for n in names if fnmatch.fnmatchcase(n, pattern))
    return chosen


def _set_submodule(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, module)


def _replace_everywhere(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Replace ``old`` under every name it is registered as (aliases share one quantized twin)."""
    names = [name for name, module in model.named_modules(remove_duplicate=False) if module is old]
    for name in names:
        _set_submodule(model, name, new)


FLOAT_DTYPES = (torch.float32, torch.float64)


def _check_quantizable(name: str, module: nn.Module) -> None:
    """Refuse, before anything changes, what a quantized twin cannot reproduce or compute."""
    label = repr(name)
    weight = module._parameters.get("weight")
    if parametrize.is_parametrized(module, "weight") or not isinstance(weight, nn.Parameter):
        raise ValueError(f"layer {label} ({type(module).__name__}) computes its weight (weight_norm or a "
                         f"parametrization), which a quantized twin cannot reproduce; remove it first "
                         f"(torch.nn.utils.parametrize.remove_parametrizations(layer, 'weight')) or exclude the layer")
    if weight.dtype not in FLOAT_DTYPES:
        raise ValueError(f"layer {label} has {str(weight.dtype).removeprefix('torch.')} weights; quantize_ needs float32 "
                         f"or float64 (model.float() first; fake quantization simulates the integer grid in float)")
    if not weight.is_meta and not bool(torch.isfinite(weight).all()):
        bad = int((~torch.isfinite(weight)).sum())
        raise ValueError(f"layer {label} has {bad} non-finite weight(s) (NaN or inf); its scales cannot be set")


def quantize_(model: nn.Module, config: QuantConfig | None = None) -> nn.Module:
    """Replace every non-excluded Conv2d/Linear of ``model`` in place by a quantized twin; returns ``model``.

    Plain Conv2d/Linear become QConv2d/QLinear; subclasses keep their own forward (:func:`quantized_twin`).
    Every layer is checked before any is replaced, so a refused model is left as it was.
    """
    config = config or QuantConfig()
    if isinstance(model, (nn.Conv2d, nn.Linear)) and not isinstance(model, QuantizedLayer):
        raise ValueError(f"quantize_ replaces layers inside a model, and the model is itself a {type(model).__name__}; "
                         f"wrap it first, e.g. quantize_(nn.Sequential(layer), config)")
    if config.fold_bn:
        fold_batchnorm_(model)
    keep = excluded_names(model, config.exclude)
    todo = [(name, module) for name, module in quantizable_layers(model)
            if name not in keep and not isinstance(module, QuantizedLayer)]
    for name, module in todo:
        _check_quantizable(name, module)
    if not quantizable_layers(model):
        warnings.warn(f"quantize_: {type(model).__name__} has no Conv2d or Linear layer; nothing was quantized", stacklevel=2)
    for name, module in todo:
        try:
            weight_quantizer = WeightQuantizer(module.weight.shape, config.weight_bits, config.granularity, config.blocks,
                                               config.symmetric, config.learnable_scales, config.weight_init,
                                               config.weight_grid)
        except ValueError as exc:  # name the layer: one block shape rarely fits every layer of a network
            raise ValueError(f"layer {name!r} (weight {tuple(module.weight.shape)}): {exc}") from exc
        # scales in the layer's precision, not the default dtype: a float64 model quantized under the
        # float32 default learned and rounded its scales in float32
        real = module.weight.dtype
        weight_quantizer.to(module.weight.device, real)
        weight_quantizer.initialize(module.weight)
        input_quantizer = None
        if config.act_bits is not None:
            input_quantizer = ActivationQuantizer(config.act_bits, config.act_signed, config.symmetric,
                                                  config.learnable_scales, config.act_init).to(module.weight.device, real)
        _replace_everywhere(model, module, quantized_twin(module, weight_quantizer, input_quantizer))
    return model


@torch.no_grad()
def calibrate_(model: nn.Module, batches: Iterable, device: str | torch.device = "cpu", max_batches: int | None = None) -> nn.Module:
    """Set activation scales (and signs) from calibration data (training data, never test).

    The model must already be on ``device`` (functions never move a caller's model).
    """
    check_model_device(model, device, "calibrate_")
    quantizers = [m for m in model.modules() if isinstance(m, ActivationQuantizer) and m.enabled]
    if not quantizers:
        return model
    was_training = model.training
    model.eval()
    for quantizer in quantizers:
        quantizer.start_observing()
    seen = 0
    try:
        for index, (images, _) in enumerate(batches):
            if max_batches is not None and index >= max_batches:
                break
            model(images.to(device))
            seen += 1
    finally:
        for quantizer in quantizers:
            quantizer.observing = False
    if seen == 0:
        raise ValueError("calibration data is empty")
    owners = {id(layer.input_quantizer): name for name, layer in quantized_layers(model) if layer.input_quantizer is not None}
    unseen = [owners.get(id(q), "?") for q in quantizers if not q.has_observations]
    if unseen:  # skipped branches (e.g. auxiliary heads in eval mode) calibrate lazily on their first batch
        warnings.warn(f"calibration: quantized layer(s) {unseen[:5]} were never called on the calibration data; "
                      f"their activation scales are left uncalibrated (set on their first batch)", stacklevel=2)
    for quantizer in quantizers:
        if quantizer.has_observations:
            quantizer.observing = True
            quantizer.finish_observing()
    model.train(was_training)
    return model


def reinitialize_weight_scales_(model: nn.Module, method: str | None = None) -> nn.Module:
    for _, layer in quantized_layers(model):
        layer.weight_quantizer.initialize(layer.weight, method)
    return model


@torch.no_grad()
def fold_batchnorm_(model: nn.Module) -> nn.Module:
    """Fold each BatchNorm2d that directly follows a Conv2d (and is its only consumer) into it.

    The graph comes from ``torch.fx`` so folding follows data flow, not naming conventions. The
    BN becomes ``nn.Identity``; the conv gains a bias. Meant for eval-mode models (PTQ, export).
    """
    try:
        graph = torch.fx.symbolic_trace(model).graph
    except Exception as exc:  # tracing fails on data-dependent control flow
        raise ValueError(f"cannot fold batch norm: torch.fx could not trace the model ({exc})") from exc
    modules = dict(model.named_modules())
    folded = 0
    for node in graph.nodes:
        if node.op != "call_module" or not isinstance(modules.get(node.target), nn.BatchNorm2d):
            continue
        source = node.args[0]
        if not (hasattr(source, "op") and source.op == "call_module" and isinstance(modules.get(source.target), nn.Conv2d)):
            continue
        if len(source.users) != 1:
            continue
        conv, bn = modules[source.target], modules[node.target]
        if bn.running_mean is None:
            continue
        factor = bn.weight / torch.sqrt(bn.running_var + bn.eps) if bn.affine else 1.0 / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias if bn.affine else torch.zeros_like(bn.running_mean)
        bias = conv.bias if conv.bias is not None else torch.zeros_like(bn.running_mean)
        conv.weight.copy_(conv.weight * factor.view(-1, 1, 1, 1))
        conv.bias = nn.Parameter(shift + (bias - bn.running_mean) * factor)
        _set_submodule(model, node.target, nn.Identity())
        folded += 1
    for _, layer in quantized_layers(model):  # folded weights need new scales
        layer.weight_quantizer.initialize(layer.weight)
    return model


@torch.no_grad()
def dequantize_(model: nn.Module, bake: bool = True) -> nn.Module:
    """Undo ``quantize_``: float Conv2d/Linear with the fake-quantized weights baked in, no quantizers
    (``bake=False``: with the float weights themselves, e.g. the full-precision model a Hessian is taken of)."""
    for name, layer in quantized_layers(model):
        if isinstance(layer, QuantizedSubclass):
            plain = layer.to_float()
            if not bake:
                plain._parameters["weight"] = nn.Parameter(layer.weight.detach().clone(), requires_grad=layer.weight.requires_grad)
            _replace_everywhere(model, layer, plain)
            continue
        weight = (layer.weight_quantizer(layer.weight.detach()) if bake else layer.weight.detach()).clone()
        if isinstance(layer, QConv2d):
            plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, stride=layer.stride,
                              padding=layer.padding, dilation=layer.dilation, groups=layer.groups,
                              bias=layer.bias is not None, padding_mode=layer.padding_mode, device=weight.device)
        else:
            plain = nn.Linear(layer.in_features, layer.out_features, bias=layer.bias is not None, device=weight.device)
        plain.weight = nn.Parameter(weight, requires_grad=layer.weight.requires_grad)
        if layer.bias is not None:
            plain.bias = nn.Parameter(layer.bias.detach().clone())
        plain.train(layer.training)
        _set_submodule(model, name, plain)
    return model
