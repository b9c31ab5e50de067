"""ONNX export of quantized models in the QDQ form runtimes read, and a check against ONNX Runtime.

The graph is the float network as ``torch.onnx.export`` traces it from :func:`dequantize_`'s copy; then
every quantized layer's weight initializer is replaced by its integer codes (int8, or uint8 with zero
points for asymmetric weights) and a per-channel ``DequantizeLinear`` (axis 0), and its input gets
``QuantizeLinear -> Clip -> DequantizeLinear`` (the QCDQ convention for widths below 8 bits: the clip
holds the codes in the quantizer's own range). Channels of one layer may have different widths: their
codes already lie in each channel's range, so one int8 tensor holds them all; 0-bit (pruned) channels
are zeros. Sub-layerwise layouts with row groups only (n_V x 1, reordered or not) are exported as
per-channel scales (each row takes its group's); layouts with column groups (n_V x n_H) through
DequantizeLinear's blocked form over the flattened input columns, where the groups are equal contiguous
runs (not reordered); reordered column groups are refused. Written by
hand on top of the ``onnx`` helpers: torch's exporter has no notion of per-channel mixed widths, and
Brevitas' QONNX/QCDQ exporters need Brevitas' own layers.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn

from ..errors import CpqError
from ..fileio import atomic_path
from .modules import QuantizedLayer
from .primitives import integer_range_int
from .transform import dequantize_, quantized_layers

OPSET = 21
MAX_EXPORT_BITS = 8
WEIGHT_CONSUMERS = ("Conv", "Gemm", "MatMul")


class OnnxExportError(CpqError):
    """A model, layer or layout that the ONNX QDQ form cannot express."""


def _require_onnx():
    try:
        import onnx
    except ImportError as exc:  # an optional dependency: say how to get it
        raise OnnxExportError("ONNX export needs the onnx package: pip install onnx onnxscript onnxruntime") from exc
    return onnx


def column_block_size(name: str, layer: QuantizedLayer) -> int | None:
    """The block size of a layout with column groups (DequantizeLinear's blocked form over the flattened
    input columns), None without column groups; an error where the groups are not equal contiguous runs
    (reordered columns), which no blocked form expresses."""
    q = layer.weight_quantizer
    n_h = q.blocks[1]
    if n_h == 1:
        return None
    cols = q.col_groups.numel()
    size = cols // n_h
    expected = torch.arange(cols) // max(size, 1)
    if cols % n_h or not torch.equal(q.col_groups.cpu().long(), expected):
        raise OnnxExportError(f"layer {name!r}: the {q.blocks[0]}x{n_h} layout's column groups are not {n_h} equal "
                              f"contiguous runs of the {cols} input columns (reordered, or {cols} is not divisible "
                              f"by {n_h}), which DequantizeLinear's blocked form cannot express")
    return size


def _per_row_scales(name: str, layer: QuantizedLayer) -> tuple[np.ndarray, np.ndarray | None]:
    """Scales (and zero points or None) per output channel, or per (output channel, column block)."""
    q = layer.weight_quantizer
    rows = layer.weight.shape[0]
    scale = q.scale.detach().abs().clamp_min(1e-8).cpu().double()
    zero = None if q.zero_point is None else q.zero_point.detach().cpu().double()
    if q.granularity == "block":
        index = q.row_groups.cpu().long()
        if column_block_size(name, layer) is None:
            scale, zero = scale[index, 0], (None if zero is None else zero[index, 0])
        else:  # (rows, n_H): each row takes its group's scales
            scale, zero = scale[index], (None if zero is None else zero[index])
    else:
        scale = scale.reshape(-1).expand(rows) if scale.numel() == 1 else scale.reshape(rows)
        if zero is not None:
            zero = zero.reshape(-1).expand(rows) if zero.numel() == 1 else zero.reshape(rows)
    return scale.numpy().astype(np.float32), None if zero is None else zero.numpy()


def weight_codes(name: str, layer: QuantizedLayer) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(codes as int8/uint8 in the weight's shape, per-channel scales, per-channel zero points)."""
    q = layer.weight_quantizer
    bits = q.bits.detach().cpu()
    if bits.numel() and int(bits.max()) > MAX_EXPORT_BITS:
        raise OnnxExportError(f"layer {name!r} has weights of up to {int(bits.max())} bits; ONNX export stores "
                              f"them as 8-bit integers (allowed: 0..{MAX_EXPORT_BITS})")
    codes = q.codes(layer.weight.detach()).cpu()
    scale, zero = _per_row_scales(name, layer)
    if column_block_size(name, layer) is not None:
        codes = codes.reshape(codes.shape[0], -1)  # blocks run over the flattened input columns
    if zero is None:
        return codes.to(torch.int8).numpy(), scale, np.zeros(scale.shape, dtype=np.int8)
    if float(codes.min()) < 0 or float(codes.max()) > 255:
        raise OnnxExportError(f"layer {name!r}: asymmetric codes outside 0..255")
    return codes.to(torch.uint8).numpy(), scale, np.rint(zero).astype(np.uint8)


def activation_grid(name: str, layer: QuantizedLayer) -> dict[str, Any] | None:
    """Scale, zero point, integer type and clip range of a layer's input quantizer (None: float input)."""
    a = layer.input_quantizer
    if a is None or not a.enabled:
        return None
    bits = int(a.bits)
    if bits > MAX_EXPORT_BITS:
        raise OnnxExportError(f"layer {name!r} quantizes its input to {bits} bits; ONNX export allows 1..{MAX_EXPORT_BITS}")
    signed = a.is_signed and a.symmetric
    if bits == 1 and signed:
        raise OnnxExportError(f"layer {name!r}: 1-bit signed activations use a sign grid (x >= 0 -> +1), which "
                              f"QuantizeLinear cannot express")
    low, high = integer_range_int(bits, signed)
    zero_point = 0 if a.symmetric else int(a.zero_point)
    kind = np.int8 if low < 0 else np.uint8
    return {"scale": np.float32(float(a.scale.detach().abs().clamp_min(1e-8))), "zero_point": kind(zero_point),
            "low": kind(low), "high": kind(high)}


def export_onnx(model: nn.Module, example_input: torch.Tensor, path: str | os.PathLike) -> Path:
    """Write ``model`` (made by ``quantize_``, calibrated) as an ONNX QDQ graph; returns the path.

    Checked with ``onnx.checker`` (full check) before the file is written (atomically); a model or
    layer the format cannot express is an :class:`OnnxExportError` naming it, and nothing is written.
    """
    onnx = _require_onnx()
    from onnx import helper, numpy_helper

    layers = quantized_layers(model)
    if not layers:
        raise OnnxExportError(f"{type(model).__name__} has no quantized layer: quantize_ it first (or export the "
                              f"float model with torch.onnx.export)")
    planned = {name: (weight_codes(name, layer), activation_grid(name, layer), column_block_size(name, layer),
                      tuple(layer.weight.shape)) for name, layer in layers}
    float_model = dequantize_(copy.deepcopy(model)).float().eval()
    example = example_input.detach().float()
    with atomic_path(path) as tmp:
        traced = tmp.with_name(tmp.name + ".traced.onnx")
        try:
            _trace(float_model, example, traced)
            graph_model = onnx.load(str(traced))
        finally:
            traced.unlink(missing_ok=True)
        _insert_qdq(graph_model, planned, helper, numpy_helper, onnx.TensorProto)
        onnx.checker.check_model(graph_model, full_check=True)
        onnx.save(graph_model, str(tmp))
    return Path(path)


def _trace(model: nn.Module, example: torch.Tensor, path: Path) -> None:
    """The float graph. ``optimize=False``: the exporter's optimizer folds BatchNorm into the preceding
    convolution's weight, which would no longer be the quantized weight."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the exporter's notes on its own internals
        torch.onnx.export(model, (example,), str(path), dynamo=True, opset_version=OPSET, external_data=False,
                          optimize=False, input_names=["input"], output_names=["logits"],
                          dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}}, verbose=False)


def _insert_qdq(graph_model, planned: dict[str, tuple], helper, numpy_helper, tensor_proto) -> None:
    graph = graph_model.graph
    initializers = {init.name: init for init in graph.initializer}
    consumers: dict[str, list] = {}
    for node in graph.node:
        for position, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, position))
    new_initializers, weight_nodes = [], []
    activation_nodes: dict[int, list] = {}
    for name, ((codes, scale, zero), grid, block_size, weight_shape) in planned.items():
        key = f"{name}.weight"
        users = [(node, position) for node, position in consumers.get(key, []) if node.op_type in WEIGHT_CONSUMERS]
        if key not in initializers or not users:
            raise OnnxExportError(f"layer {name!r}: its weight did not come out of torch.onnx.export as the initializer "
                                  f"{key!r} of a Conv/Gemm node (the exporter folded it into something else)")
        traced = numpy_helper.to_array(initializers[key]).astype(np.float64)
        if block_size is None:
            expand = lambda v: v.astype(np.float64).reshape(-1, *[1] * (codes.ndim - 1))  # noqa: E731
        else:
            expand = lambda v: np.repeat(v.astype(np.float64), block_size, axis=1)  # noqa: E731
        expected = ((codes.astype(np.float64) - expand(zero)) * expand(scale)).reshape(weight_shape)
        if traced.shape != weight_shape or not np.allclose(traced, expected, rtol=1e-5, atol=1e-7):
            raise OnnxExportError(f"layer {name!r}: the traced weight {key!r} is not the layer's quantized weight (the "
                                  f"exporter changed it, e.g. folded a following BatchNorm into it)")
        graph.initializer.remove(initializers[key])
        new_initializers += [numpy_helper.from_array(codes, f"{key}_quantized"),
                             numpy_helper.from_array(scale, f"{key}_scale"), numpy_helper.from_array(zero, f"{key}_zero_point")]
        if block_size is None:
            weight_nodes.append(helper.make_node("DequantizeLinear", [f"{key}_quantized", f"{key}_scale", f"{key}_zero_point"],
                                                 [key], name=f"{name}/weight_dequantize", axis=0))
        else:  # blocked form over the flattened columns, then the layer's own shape
            new_initializers.append(numpy_helper.from_array(np.array(weight_shape, dtype=np.int64), f"{key}_shape"))
            weight_nodes += [helper.make_node("DequantizeLinear", [f"{key}_quantized", f"{key}_scale", f"{key}_zero_point"],
                                              [f"{key}_2d"], name=f"{name}/weight_dequantize", axis=1, block_size=block_size),
                             helper.make_node("Reshape", [f"{key}_2d", f"{key}_shape"], [key], name=f"{name}/weight_reshape")]
        if grid is None:
            continue
        prefix = f"{name}/input"
        new_initializers += [numpy_helper.from_array(np.array(grid["scale"], dtype=np.float32), f"{prefix}_scale"),
                             numpy_helper.from_array(np.array(grid["zero_point"]), f"{prefix}_zero_point"),
                             numpy_helper.from_array(np.array(grid["low"]), f"{prefix}_low"),
                             numpy_helper.from_array(np.array(grid["high"]), f"{prefix}_high")]
        for call, (node, _) in enumerate(users):  # a layer called twice gets the quantizer before each call
            source, tag = node.input[0], f"{prefix}_{call}"
            activation_nodes.setdefault(id(node), []).extend([
                helper.make_node("QuantizeLinear", [source, f"{prefix}_scale", f"{prefix}_zero_point"], [f"{tag}_codes"],
                                 name=f"{tag}/quantize"),
                helper.make_node("Clip", [f"{tag}_codes", f"{prefix}_low", f"{prefix}_high"], [f"{tag}_clipped"],
                                 name=f"{tag}/clip"),
                helper.make_node("DequantizeLinear", [f"{tag}_clipped", f"{prefix}_scale", f"{prefix}_zero_point"],
                                 [f"{tag}_dequantized"], name=f"{tag}/dequantize")])
            node.input[0] = f"{tag}_dequantized"
    ordered = list(weight_nodes)
    for node in graph.node:
        ordered.extend(activation_nodes.get(id(node), []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    graph.initializer.extend(new_initializers)


def verify_onnx(path: str | os.PathLike, model: nn.Module, batches: Iterable, optimize: bool = False,
                max_batches: int | None = None) -> dict[str, float]:
    """Run the exported graph in ONNX Runtime (CPU) and ``model`` in eval mode on the same batches.

    Returns the largest and median absolute logit difference, the median difference relative to the
    logits' scale, top-1 agreement and the number of inputs; where the batches carry labels, both
    models' accuracies too. ``optimize=False`` keeps the QDQ graph's
    float semantics; ``True`` lets ONNX Runtime fuse QDQ patterns into integer kernels (their
    accumulation rounds differently: expect high agreement, not identity).
    """
    try:
        import onnxruntime as ort
    except ImportError as exc:
        raise OnnxExportError("verify_onnx needs onnxruntime: pip install onnxruntime") from exc
    options = ort.SessionOptions()
    options.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimize
                                        else ort.GraphOptimizationLevel.ORT_DISABLE_ALL)
    options.intra_op_num_threads = max(1, torch.get_num_threads())
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    input_name = session.get_inputs()[0].name
    was_training = model.training
    model.eval()
    differences, relative, agree, seen = [], [], 0, 0
    right = {"cpq_accuracy": 0, "onnx_accuracy": 0}
    labelled = True
    try:
        with torch.no_grad():
            for index, (images, labels) in enumerate(batches):
                if max_batches is not None and index >= max_batches:
                    break
                reference = model(images).float().cpu()
                exported = torch.from_numpy(session.run(None, {input_name: images.float().cpu().numpy()})[0])
                difference = (exported - reference).abs()
                differences.append(difference.flatten())
                relative.append((difference / reference.abs().amax(1, keepdim=True).clamp_min(1e-12)).flatten())
                agree += int((exported.argmax(1) == reference.argmax(1)).sum())
                seen += len(images)
                if labels is None:
                    labelled = False
                else:
                    right["cpq_accuracy"] += int((reference.argmax(1) == labels.cpu()).sum())
                    right["onnx_accuracy"] += int((exported.argmax(1) == labels.cpu()).sum())
    finally:
        model.train(was_training)
    if not seen:
        raise ValueError("verify_onnx: the batches are empty")
    every, scaled = torch.cat(differences), torch.cat(relative)
    return {"max_abs_difference": float(every.max()), "median_abs_difference": float(every.median()),
            "median_relative_difference": float(scaled.median()), "top1_agreement": agree / seen, "inputs": seen,
            "optimized": bool(optimize), **({k: v / seen for k, v in right.items()} if labelled else {})}
