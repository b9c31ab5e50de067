"""Operator and model metrics: average bits, BitOPs, size in bytes by formula, compression ratio.

The size formula counts exactly what ``cpq_lib.quant.export`` writes:
- quantized layer: each output channel's weights at its bit-width, the bit-width table (8 bits per
  channel), one fp32 scale per block, a 16-bit zero point per block when asymmetric, the block maps
  (16 bits per row and column) when the blocks are not contiguous runs (per-layer index maps; contiguous
  blocks, permuted ones included, follow from the scale's shape), the bias at 32 bits, and for the
  input quantizer a 32-bit scale, a 16-bit zero point when asymmetric and 16 bits of bit-width/sign;
- everything else needed to run the model (batch norm, full-precision layers, input normalisation) at
  32 bits per value; bookkeeping buffers (``num_batches_tracked``) are not stored.
"""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from torch import nn

from .modules import QuantizedLayer

FLOAT_BITS = 32
BITS_TABLE_BITS = 8
SCALE_BITS = 32
ZERO_POINT_BITS = 16
GROUP_INDEX_BITS = 16
ACT_HEADER_BITS = 16  # activation bit-width and sign flag, 8 bits each


def is_bookkeeping(key: str) -> bool:
    return key.endswith("num_batches_tracked")


def is_quantizer_state(key: str) -> bool:
    return ".weight_quantizer." in f".{key}" or ".input_quantizer." in f".{key}"


def compute_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every convolution (any dimension, transposed too) and Linear that runs as a module.

    Conv2d / Linear are the quantizable ones; the others (Conv1d, ConvTranspose2d, ...) stay in full
    precision and are listed so that sizes and BitOPs account for them.
    """
    from .transform import weights_read_directly

    direct = weights_read_directly(model)
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.modules.conv._ConvNd, nn.Linear)) and name not in direct]


def _macs_of_call(module: nn.Module, inputs: tuple, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call, per sample."""
    if isinstance(module, nn.modules.conv._ConvTransposeNd):  # every input position meets the whole kernel
        return math.prod(inputs[0].shape[2:]) * module.weight.numel()
    if isinstance(module, nn.modules.conv._ConvNd):
        return math.prod(output.shape[2:]) * module.weight.numel()
    return math.prod(output.shape[1:-1]) * module.weight.numel()  # Linear: every position of (B, ..., features)


@torch.no_grad()
def layer_calls(model: nn.Module, example_input: torch.Tensor) -> dict[str, tuple[int, int]]:
    """Per compute layer: (calls, MACs per sample summed over calls) in one eval-mode forward.

    A module called twice (weight sharing) counts twice; one never called (a branch skipped in eval
    mode) counts zero.
    """
    counts: dict[str, list[int]] = {name: [0, 0] for name, _ in compute_layers(model)}
    hooks = []
    for name, module in compute_layers(model):
        def hook(mod, inputs, output, name=name):
            counts[name][0] += 1
            counts[name][1] += _macs_of_call(mod, inputs, output)
        hooks.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(example_input[:1])
    finally:
        for handle in hooks:
            handle.remove()
        model.train(was_training)
    return {name: (calls, macs) for name, (calls, macs) in counts.items()}


def layer_storage_bits(layer: QuantizedLayer) -> dict[str, int]:
    """Stored bits of one quantized layer, by component (see module docstring)."""
    q = layer.weight_quantizer
    per_channel = math.prod(layer.weight.shape[1:])
    n_blocks = q.scale.numel()
    parts = {
        "weights": int(q.bits.sum()) * per_channel,
        "bit_table": BITS_TABLE_BITS * layer.weight.shape[0],
        "scales": SCALE_BITS * n_blocks,
        "zero_points": ZERO_POINT_BITS * n_blocks if q.zero_point is not None else 0,
        # group-index maps only where the blocks are not contiguous runs (index-map reordering)
        "block_maps": (GROUP_INDEX_BITS * (q.row_groups.numel() + q.col_groups.numel())
                       if q.granularity == "block" and not q.contiguous_blocks else 0),
        "bias": FLOAT_BITS * layer.bias.numel() if layer.bias is not None else 0,
        "activation": 0,
    }
    a = layer.input_quantizer
    if a is not None and a.enabled:
        parts["activation"] = SCALE_BITS + ACT_HEADER_BITS + (0 if a.symmetric else ZERO_POINT_BITS)
    return parts


def unique_state_items(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with each tensor once: a module registered under two names (``self.b = self.a``)
    or a tied parameter appears in a state dict under every name, but is stored (and counted) once."""
    seen: set[tuple] = set()
    items = {}
    for key, value in model.state_dict().items():
        identity = (value.data_ptr(), value.storage_offset(), tuple(value.shape), value.stride(), value.dtype, value.device)
        if value.numel() and identity in seen:
            continue
        seen.add(identity)
        items[key] = value
    return items


def float_state_items(model: nn.Module) -> dict[str, torch.Tensor]:
    """State entries stored at 32 bits: everything but quantized layers' weights/biases and quantizer state."""
    quantized = {name for name, m in model.named_modules(remove_duplicate=False) if isinstance(m, QuantizedLayer)}
    items = {}
    for key, value in unique_state_items(model).items():
        owner, _, leaf = key.rpartition(".")
        if is_bookkeeping(key) or is_quantizer_state(key) or (owner in quantized and leaf in ("weight", "bias")):
            continue
        items[key] = value
    return items


def layer_table(model: nn.Module, example_input: torch.Tensor) -> pd.DataFrame:
    """One row per compute layer: parameters, calls, bits, MACs, BitOPs and stored bytes."""
    calls = layer_calls(model, example_input)
    rows = []
    for name, module in compute_layers(model):
        out_channels = module.weight.shape[0]
        count, macs = calls[name]
        if isinstance(module, QuantizedLayer):
            macs_per_weight_channel = macs / out_channels
            bits = module.weight_bits().double()
            act = module.activation_bits()
            storage = sum(layer_storage_bits(module).values())
            row = {"quantized": True, "weight_bits": float(bits.mean()), "min_bits": int(bits.min()),
                   "max_bits": int(bits.max()), "pruned_channels": int((bits == 0).sum()),
                   "act_bits": act, "granularity": module.weight_quantizer.granularity,
                   "scales": module.weight_quantizer.scale.numel(),
                   "bitops": float((bits * macs_per_weight_channel).sum()) * (act if act is not None else FLOAT_BITS)}
        else:
            storage = FLOAT_BITS * (module.weight.numel() + (module.bias.numel() if module.bias is not None else 0))
            row = {"quantized": False, "weight_bits": float(FLOAT_BITS), "min_bits": FLOAT_BITS, "max_bits": FLOAT_BITS,
                   "pruned_channels": 0, "act_bits": None, "granularity": "float", "scales": 0,
                   "bitops": float(macs * FLOAT_BITS * FLOAT_BITS)}
        rows.append({"layer": name, "type": type(module).__name__, "out_channels": out_channels,
                     "groups": getattr(module, "groups", 1), "params": module.weight.numel(), "calls": count,
                     "macs": macs, **row, "bytes": storage / 8})
    return pd.DataFrame(rows).set_index("layer")


def model_size_bits(model: nn.Module) -> int:
    """Stored size of the whole model in bits (the formula; see module docstring)."""
    quantized = [m for m in model.modules() if isinstance(m, QuantizedLayer)]
    layer_bits = sum(sum(layer_storage_bits(m).values()) for m in quantized)
    other = sum(FLOAT_BITS * v.numel() for v in float_state_items(model).values())
    return layer_bits + other


def float_size_bits(model: nn.Module) -> int:
    """Size of the same model with everything at 32 bits (the compression baseline)."""
    return sum(FLOAT_BITS * v.numel() for k, v in unique_state_items(model).items()
               if not is_bookkeeping(k) and not is_quantizer_state(k))


def model_summary(model: nn.Module, example_input: torch.Tensor) -> dict[str, Any]:
    """Model-level metrics: average weight bits (quantized layers, all layers), BitOPs, bytes, ratio."""
    table = layer_table(model, example_input)
    quantized = table[table["quantized"]]
    weight_bit_sum = (quantized["weight_bits"] * quantized["params"]).sum()
    all_bit_sum = weight_bit_sum + (table.loc[~table["quantized"], "params"] * FLOAT_BITS).sum()
    act = quantized["act_bits"].dropna()
    size = model_size_bits(model)
    float_size = float_size_bits(model)
    return {
        "avg_weight_bits": float(weight_bit_sum / quantized["params"].sum()) if len(quantized) else float(FLOAT_BITS),
        "avg_weight_bits_all_layers": float(all_bit_sum / table["params"].sum()),
        "avg_act_bits": float((act * quantized.loc[act.index, "macs"]).sum() / quantized.loc[act.index, "macs"].sum()) if len(act) else None,
        "quantized_layers": int(len(quantized)), "float_layers": int((~table["quantized"]).sum()),
        "macs": int(table["macs"].sum()), "bitops": float(table["bitops"].sum()),
        "size_bytes": size / 8, "float_size_bytes": float_size / 8, "compression_ratio": float_size / size,
    }
