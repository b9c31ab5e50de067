"""Export a quantized model as packed integer codes: one compact file, no pickle.

Layout: ``b"CPQPACK2"``, a little-endian uint32 header length, a zlib-compressed JSON header listing
the entries (name, dtype, shape) in order, the entries' raw bytes back to back, then the SHA-256 of
everything before it (a flipped bit anywhere is an error, not a silently different model). Loading
validates every field (finite positive scales, bit-widths in range, shapes within the file, block
indices in range) before anything is written into the model. Weight codes are
packed at each channel's own bit-width (LSB first); everything else is stored as the metrics module's
size formula counts it, so the file size tracks ``metrics.model_size_bits`` up to the header.
Loading needs a quantized model of the same structure (built and ``quantize_``-d like the original);
its outputs then match the exported fake-quantized model exactly.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..fileio import atomic_path
from .modules import QuantizedLayer
from .metrics import float_state_items
from .primitives import dequantize_codes, integer_range
from .quantizers import contiguous_groups
from .transform import quantized_layers

MAGIC = b"CPQPACK2"
OLD_MAGIC = b"CPQPACK1"  # format 1 had no checksum
DIGEST_BYTES = 32
DTYPES = {"uint8": np.uint8, "int8": np.int8, "int16": np.int16, "uint16": np.uint16, "float32": np.float32}


def _offsets(bits: torch.Tensor, signed: bool, narrow: bool = True) -> torch.Tensor:
    """Per-channel offset that maps codes to unsigned values (code - qmin); sign codes map to 0/1 below."""
    qmin, _ = integer_range(bits, signed, narrow)
    return qmin


def pack_codes(codes: torch.Tensor, bits: torch.Tensor, signed: bool, narrow: bool = True) -> np.ndarray:
    """Pack a (out, per_channel) matrix of integer codes at per-row bit-widths into bytes."""
    rows, per_row = codes.shape
    unsigned = codes - _offsets(bits, signed, narrow)[:, None]
    binary = (bits == 1) & signed
    unsigned = torch.where(binary[:, None], (codes + 1) / 2, unsigned)
    widths = bits.repeat_interleave(per_row).numpy()
    values = unsigned.flatten().round().to(torch.int64).numpy()
    planes = ((values[:, None] >> np.arange(16)) & 1).astype(bool)
    stream = planes[np.arange(16)[None, :] < widths[:, None]]
    return np.packbits(stream, bitorder="little")


def unpack_codes(packed: np.ndarray, bits: torch.Tensor, per_row: int, signed: bool, narrow: bool = True) -> torch.Tensor:
    widths = bits.repeat_interleave(per_row).numpy()
    mask = np.arange(16)[None, :] < widths[:, None]
    stream = np.unpackbits(packed, bitorder="little", count=int(widths.sum())).astype(bool)
    planes = np.zeros(mask.shape, dtype=bool)
    planes[mask] = stream
    values = torch.from_numpy((planes * (1 << np.arange(16))).sum(axis=1).astype(np.float32)).view(len(bits), per_row)
    codes = values + _offsets(bits, signed, narrow)[:, None]
    binary = (bits == 1) & signed
    return torch.where(binary[:, None], values * 2 - 1, codes)


def _layer_entries(name: str, layer: QuantizedLayer) -> dict[str, np.ndarray]:
    q = layer.weight_quantizer
    weight = layer.weight.detach().cpu()
    codes = q.codes(layer.weight.detach()).cpu().reshape(weight.shape[0], -1)
    entries = {
        f"{name}:codes": pack_codes(codes, q.bits.cpu(), q.symmetric, q.narrow),
        f"{name}:bits": q.bits.cpu().numpy().astype(np.uint8),
        f"{name}:scale": q.scale.detach().cpu().numpy().astype(np.float32),
    }
    if not q.narrow:  # the full signed grid; absent: the narrow one (files written before the option)
        entries[f"{name}:full_grid"] = np.array([1], dtype=np.uint8)
    if q.zero_point is not None:
        entries[f"{name}:zero_point"] = q.zero_point.cpu().numpy().astype(np.uint16)  # 0..65535 at 16 bits
    if q.granularity == "block" and not q.contiguous_blocks:  # contiguous blocks follow from the scale's shape
        entries[f"{name}:row_groups"] = q.row_groups.cpu().numpy().astype(np.int16)
        entries[f"{name}:col_groups"] = q.col_groups.cpu().numpy().astype(np.int16)
    if layer.bias is not None:
        entries[f"{name}:bias"] = layer.bias.detach().cpu().numpy().astype(np.float32)
    a = layer.input_quantizer
    if a is not None and a.enabled:
        entries[f"{name}:act_scale"] = np.array([float(a.scale)], dtype=np.float32)
        entries[f"{name}:act_info"] = np.array([int(a.bits), int(a.signed)], dtype=np.int8)
        if not a.symmetric:
            entries[f"{name}:act_zero_point"] = np.array([int(a.zero_point)], dtype=np.uint16)
    return entries


def export_packed(model: nn.Module, path: str | os.PathLike, meta: dict[str, Any] | None = None) -> int:
    """Write ``model`` (quantized) to ``path``; returns the file size in bytes."""
    entries: dict[str, np.ndarray] = {}
    for name, layer in quantized_layers(model):
        entries.update(_layer_entries(name, layer))
    for key, value in float_state_items(model).items():
        entries[key] = value.detach().cpu().float().numpy()
    return write_packed(entries, path, meta)


def write_packed(entries: dict[str, np.ndarray], path: str | os.PathLike, meta: dict[str, Any] | None = None) -> int:
    """Write named arrays in the packed layout (header, payload, checksum), atomically; returns the size."""
    header = {"format": "cpq-packed/2", "meta": meta or {},
              "entries": [[key, str(array.dtype), list(array.shape)] for key, array in entries.items()]}
    blob = zlib.compress(json.dumps(header, separators=(",", ":")).encode(), 9)
    digest = hashlib.sha256()
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            for chunk in (MAGIC + struct.pack("<I", len(blob)) + blob,
                          *(np.ascontiguousarray(array).tobytes() for array in entries.values())):
                handle.write(chunk)
                digest.update(chunk)
            handle.write(digest.digest())
    return Path(path).stat().st_size


def read_packed(path: str | os.PathLike) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Parse a packed file into named arrays, with clear errors for anything malformed."""
    data = Path(path).read_bytes() if Path(path).is_file() else None
    if data is None:
        raise CheckpointError(f"packed model {path} does not exist")
    if data.startswith(OLD_MAGIC):
        raise CheckpointError(f"{path} is a packed model of format 1 (no checksum, fields not validated); export it again")
    if not data.startswith(MAGIC) or len(data) < len(MAGIC) + 4 + DIGEST_BYTES:
        raise CheckpointError(f"{path} is not a cpq packed model (bad magic)")
    data, stored = data[:-DIGEST_BYTES], data[-DIGEST_BYTES:]
    if hashlib.sha256(data).digest() != stored:
        raise CheckpointError(f"{path}: checksum mismatch: the file is damaged (or truncated) since it was written")
    (length,) = struct.unpack("<I", data[len(MAGIC):len(MAGIC) + 4])
    start = len(MAGIC) + 4
    try:
        header = json.loads(zlib.decompress(data[start:start + length]))
    except (zlib.error, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: corrupted header ({exc})") from exc
    entries = header.get("entries") if isinstance(header, dict) else None
    if not isinstance(entries, list) or not all(
            isinstance(e, list) and len(e) == 3 and isinstance(e[0], str) and isinstance(e[1], str)
            and isinstance(e[2], list) and all(isinstance(d, int) and d >= 0 for d in e[2]) for e in entries):
        raise CheckpointError(f"{path}: the header has no valid 'entries' list of [name, dtype, shape]; the file is damaged "
                              f"or not written by export_packed")
    offset, arrays = start + length, {}
    for key, dtype, shape in entries:
        if dtype not in DTYPES:
            raise CheckpointError(f"{path}: entry {key!r} has unsupported dtype {dtype!r}; allowed: {sorted(DTYPES)}")
        count = math.prod(shape)  # Python integers: a crafted shape cannot overflow
        size = count * np.dtype(DTYPES[dtype]).itemsize
        if offset + size > len(data):
            raise CheckpointError(f"{path} is truncated: entry {key!r} needs {size} bytes at offset {offset}")
        arrays[key] = np.frombuffer(data, dtype=DTYPES[dtype], count=count, offset=offset).reshape(shape).copy()
        offset += size
    if offset != len(data):
        raise CheckpointError(f"{path}: {len(data) - offset} unexpected trailing bytes")
    meta = header.get("meta", {})
    return arrays, meta if isinstance(meta, dict) else {}


def _entry(arrays: dict[str, np.ndarray], key: str, path: str | os.PathLike) -> np.ndarray:
    if key not in arrays:
        raise CheckpointError(f"{path}: entry {key!r} is missing")
    return arrays[key]


def _layer_values(name: str, layer: QuantizedLayer, arrays: dict[str, np.ndarray], path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``import_packed`` will write into one layer, checked against the layer's shapes."""
    q = layer.weight_quantizer
    bits = torch.from_numpy(_entry(arrays, f"{name}:bits", path).astype(np.int64))
    if bits.shape != q.bits.shape:
        raise CheckpointError(f"{path}: layer {name!r} has {bits.numel()} channels, the model {q.bits.numel()}")
    if bits.numel() and int(bits.max()) > 16:
        raise CheckpointError(f"{path}: layer {name!r} has bit-widths above 16 (allowed: 0..16), e.g. {int(bits.max())}")
    values: dict[str, Any] = {"bits": bits}
    row_groups, col_groups = q.row_groups, q.col_groups
    if f"{name}:row_groups" in arrays:
        row_groups = torch.from_numpy(_entry(arrays, f"{name}:row_groups", path).astype(np.int64))
        col_groups = torch.from_numpy(_entry(arrays, f"{name}:col_groups", path).astype(np.int64))
        if row_groups.shape != q.row_groups.shape or col_groups.shape != q.col_groups.shape:
            raise CheckpointError(f"{path}: layer {name!r} has block maps that do not fit its weight")
        for label, groups, count in (("row", row_groups, q.blocks[0]), ("column", col_groups, q.blocks[1])):
            if groups.numel() and (int(groups.min()) < 0 or int(groups.max()) >= count):
                raise CheckpointError(f"{path}: layer {name!r} has {label} group indices from {int(groups.min())} to "
                                      f"{int(groups.max())}; allowed: 0..{count - 1}")
        values["groups"] = (row_groups, col_groups)
    else:  # no maps: contiguous blocks, as many as the scale has (per tensor, per channel, or n_V x n_H runs)
        shape = tuple(_entry(arrays, f"{name}:scale", path).shape)
        if len(shape) != 2 or not (1 <= shape[0] <= row_groups.numel() and 1 <= shape[1] <= col_groups.numel()):
            raise CheckpointError(f"{path}: layer {name!r} has scales of shape {shape}; a layer of {row_groups.numel()} rows "
                                  f"and {col_groups.numel()} input columns allows (n_V <= rows, n_H <= columns)")
        row_groups, col_groups = contiguous_groups(row_groups.numel(), shape[0]), contiguous_groups(col_groups.numel(), shape[1])
        if not (torch.equal(row_groups, q.row_groups.cpu()) and torch.equal(col_groups, q.col_groups.cpu())):
            values["groups"] = (row_groups, col_groups)
    blocks = (int(row_groups.max()) + 1, int(col_groups.max()) + 1)
    scale = torch.from_numpy(_entry(arrays, f"{name}:scale", path))
    if tuple(scale.shape) != blocks:
        raise CheckpointError(f"{path}: layer {name!r} has scales of shape {tuple(scale.shape)}, its blocks need {blocks}")
    if not bool(torch.isfinite(scale).all()) or not bool((scale > 0).all()):
        raise CheckpointError(f"{path}: layer {name!r} has scales that are not finite and positive "
                              f"(e.g. {scale[~(torch.isfinite(scale) & (scale > 0))][:3].tolist()})")
    values["scale"] = scale
    zero_point = None
    if q.zero_point is not None:
        zero_point = torch.from_numpy(_entry(arrays, f"{name}:zero_point", path).astype(np.float32))
        if tuple(zero_point.shape) != blocks:
            raise CheckpointError(f"{path}: layer {name!r} has zero points of shape {tuple(zero_point.shape)}, expected {blocks}")
        values["zero_point"] = zero_point
    per_row = layer.weight[0].numel()
    packed = _entry(arrays, f"{name}:codes", path)
    if packed.size * 8 < int(bits.sum()) * per_row:
        raise CheckpointError(f"{path}: layer {name!r} holds {packed.size} bytes of codes, its bit-widths need more")
    if (f"{name}:full_grid" in arrays) == q.narrow:
        raise CheckpointError(f"{path}: layer {name!r} was written on the {'full' if q.narrow else 'narrow'} weight grid, "
                              f"the model quantizes on the {q.grid_name} one (QuantConfig.weight_grid)")
    codes = unpack_codes(packed, bits, per_row, q.symmetric, q.narrow).view(layer.weight.shape)
    expand = lambda v: v[row_groups][:, col_groups].view(q.weight_shape) if v.shape[1] > 1 else v[row_groups].view(q.weight_shape[0], *(1,) * (len(q.weight_shape) - 1))  # noqa: E731
    values["weight"] = dequantize_codes(codes, expand(scale), None if zero_point is None else expand(zero_point))
    if layer.bias is not None:
        bias = torch.from_numpy(_entry(arrays, f"{name}:bias", path))
        if bias.shape != layer.bias.shape:
            raise CheckpointError(f"{path}: layer {name!r} has a bias of {bias.numel()} values, the model {layer.bias.numel()}")
        values["bias"] = bias
    a = layer.input_quantizer
    quantizes_inputs = a is not None and a.enabled
    if (f"{name}:act_scale" in arrays) != quantizes_inputs:
        raise CheckpointError(f"{path}: layer {name!r} " + ("has activation quantization in the file and none in the model "
                              "(quantize the model with act_bits)" if quantizes_inputs is False else
                              "quantizes activations in the model and not in the file (quantize with act_bits=None)"))
    if quantizes_inputs:
        act_scale, info = _entry(arrays, f"{name}:act_scale", path), _entry(arrays, f"{name}:act_info", path)
        if act_scale.shape != (1,) or info.shape != (2,):
            raise CheckpointError(f"{path}: layer {name!r} has activation entries of shapes {act_scale.shape}, {info.shape}; "
                                  f"expected (1,) and (2,)")
        bits_a, signed = (int(v) for v in info)
        scale_a = float(act_scale[0])
        if not 1 <= bits_a <= 16 or signed not in (0, 1) or not (math.isfinite(scale_a) and scale_a > 0):
            raise CheckpointError(f"{path}: layer {name!r} has activation bits {bits_a} (allowed 1..16), sign flag {signed} "
                                  f"(allowed 0, 1) and scale {scale_a} (allowed: finite, > 0)")
        if (f"{name}:act_zero_point" in arrays) == a.symmetric:
            raise CheckpointError(f"{path}: layer {name!r}: the file's activation zero point does not fit the model's "
                                  f"{'symmetric' if a.symmetric else 'asymmetric'} quantizer")
        values["act"] = (scale_a, bits_a, signed,
                         int(arrays[f"{name}:act_zero_point"][0]) if f"{name}:act_zero_point" in arrays else None)
    return values


@torch.no_grad()
def import_packed(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a packed file into a quantized model of the same structure (in place).

    Every entry is read and checked against the model first; only then is anything written, so a
    file that does not fit leaves the model as it was.
    """
    arrays, _ = read_packed(path)
    layers = dict(quantized_layers(model))
    packed_layers = {key.split(":")[0] for key in arrays if ":" in key}
    if packed_layers != set(layers):
        raise CheckpointError(f"{path} does not fit this model: layers differ "
                              f"(only in file: {sorted(packed_layers - set(layers))[:3]}, only in model: {sorted(set(layers) - packed_layers)[:3]})")
    planned = {name: _layer_values(name, layer, arrays, path) for name, layer in layers.items()}
    rest = {key: torch.from_numpy(value) for key, value in arrays.items() if ":" not in key}
    expected = float_state_items(model)
    if set(rest) != set(expected):
        raise CheckpointError(f"{path} does not fit this model: float entries differ "
                              f"({sorted(set(rest) ^ set(expected))[:4]})")
    for key, value in rest.items():
        if value.numel() != expected[key].numel():
            raise CheckpointError(f"{path}: entry {key!r} has {value.numel()} values, the model {expected[key].numel()}")
    # everything fits: write
    for name, layer in layers.items():
        q, values = layer.weight_quantizer, planned[name]
        if "groups" in values:
            q.set_groups(*values["groups"])
        q.bits.copy_(values["bits"])
        q.scale.copy_(values["scale"])
        if "zero_point" in values:
            q.zero_point.copy_(values["zero_point"])
        layer.weight.copy_(values["weight"])
        q.initialized.fill_(True)
        q.refresh_state()
        if "bias" in values:
            layer.bias.copy_(values["bias"])
        if "act" in values:
            a = layer.input_quantizer
            scale, bits_a, signed, zero_point = values["act"]
            a.scale.fill_(scale)
            a.bits.fill_(bits_a)
            a.signed.fill_(signed)
            if zero_point is not None:
                a.zero_point.fill_(zero_point)
            a.initialized.fill_(True)
            a.refresh_state()
    state = model.state_dict()
    for key, value in rest.items():
        state[key].copy_(value.view(state[key].shape).to(state[key].dtype))
    return model
