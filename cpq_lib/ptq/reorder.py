"""PTQ-SL's channel reordering: put channels of similar range into the same block, two ways.

``permute`` (:func:`permute_reorder_`, the paper's deployable form): one permutation per channel
space (:mod:`.channel_graph`): the output order of a layer is the input order of every layer that
reads it, and every tensor of one residual stream shares it. The weights, biases, BatchNorms and
depthwise convolutions are permuted physically, the network computes the same function, and the
blocks are then contiguous: a kernel with equal contiguous blocks runs it with no index maps. A
space shared by several layers is sorted by their mean normalised channel range, so no single
layer gets its own best order: that is the price of consistency the study measures.

``index_sort`` / ``index_kmeans`` (:func:`reorder_channels_`): an easier-to-win variant that keeps
the weights in place and changes which block each row (output channel) and column (input channel)
belongs to: the quantizer's ``row_groups`` / ``col_groups`` index vectors, one per layer, chosen for
that layer alone. The runtime must gather by these maps, and the size metric charges them
(:data:`cpq_lib.quant.metrics.GROUP_INDEX_BITS` per entry). ``index_sort`` cuts each layer's
range-sorted order into nearly equal groups; ``index_kmeans`` clusters the log-ranges
(scikit-learn's KMeans, seeded) into groups of unequal size.

Index-map columns are grouped by input channel (a channel's kh x kw columns stay together), by the
channel's range over the whole layer; when a layer has fewer input channels (per convolution group)
than column groups, its column grouping is left contiguous and the returned table says so.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..quant.modules import QuantizedLayer
from ..quant.primitives import as_real
from ..quant.quantizers import contiguous_groups
from ..quant.transform import quantized_layers
from .channel_graph import ChannelSpace, channel_spaces

INDEX_METHODS = ("index_sort", "index_kmeans")  # per-layer index maps (reorder_channels_)
REORDER_METHODS = ("permute", *INDEX_METHODS)    # "none" is no reordering


def _groups_from_values(values: torch.Tensor, groups: int, method: str, seed: int) -> torch.Tensor:
    """Group index per entry: entries of similar value share a group (0 = smallest values)."""
    count = values.numel()
    if method == "index_sort":
        order = torch.argsort(values, stable=True)
        assignment = torch.empty(count, dtype=torch.long)
        assignment[order] = contiguous_groups(count, groups)
        return assignment
    from sklearn.cluster import KMeans

    logs = torch.log(values.double().clamp_min(1e-12)).numpy().reshape(-1, 1)
    distinct = len(np.unique(logs))
    if distinct < groups:  # fewer distinct ranges than groups: clustering cannot fill them, sorting can
        return _groups_from_values(values, groups, "index_sort", seed)
    labels = KMeans(n_clusters=groups, n_init=10, random_state=seed).fit(logs).labels_
    centres = np.array([logs[labels == k].mean() for k in range(groups)])
    rank = np.empty(groups, dtype=np.int64)
    rank[np.argsort(centres)] = np.arange(groups)
    return torch.from_numpy(rank[labels])


def channel_ranges(weight: torch.Tensor, groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(max |w| per output channel, max |w| per input channel of a convolution group) of a weight (out, in, ...)."""
    w = as_real(weight.detach()).abs()
    rows = w.reshape(w.shape[0], -1).amax(1)
    inputs = w.reshape(w.shape[0], w.shape[1], -1).amax(2).amax(0)
    return rows, inputs


def reorder_groups(weight: torch.Tensor, blocks: tuple[int, int], method: str = "index_sort", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Row and column group vectors for ``blocks`` = (n_V, n_H) that gather channels of similar range.

    Returns (row_groups, col_groups, columns_regrouped): column groups cover the flattened input
    columns (in x kh x kw); they stay contiguous when there are fewer input channels than groups.
    """
    if method not in INDEX_METHODS:
        raise ValueError(f"index-map reorder method {method!r} is not allowed; choose one of {list(INDEX_METHODS)}")
    n_v, n_h = blocks
    rows, inputs = channel_ranges(weight)
    cols = int(np.prod(weight.shape[1:]))
    if not 1 <= n_v <= rows.numel():
        raise ValueError(f"output groups must be in 1..{rows.numel()}, got {n_v}")
    row_groups = _groups_from_values(rows, n_v, method, seed)
    per_channel = cols // inputs.numel()
    if n_h > inputs.numel():
        return row_groups, contiguous_groups(cols, n_h), False
    channel_groups = _groups_from_values(inputs, n_h, method, seed)
    return row_groups, channel_groups.repeat_interleave(per_channel), n_h > 1


def _spread(values: torch.Tensor, groups: torch.Tensor) -> float:
    """Mean over groups of max/min range within the group (1.0: every group holds equal ranges)."""
    ratios = []
    for g in torch.unique(groups):
        member = values[groups == g].clamp_min(1e-12)
        ratios.append(float(member.max() / member.min()))
    return float(np.mean(ratios))


@torch.no_grad()
def reorder_channels_(model: nn.Module, method: str = "index_sort", seed: int = 0, layers: Iterable[str] | None = None) -> pd.DataFrame:
    """Index-map variant: regroup every block-granular quantized layer (or those in ``layers``) by channel range.

    Weight scales are re-initialised for the new blocks (by each quantizer's own init method); layers
    with one row group and one column group, or one group per channel, are left alone. Returns a table
    per layer: blocks, whether rows / columns were regrouped, and the mean within-group range spread
    (max / min channel range) of the rows before and after.
    """
    if method not in INDEX_METHODS:
        raise ValueError(f"index-map reorder method {method!r} is not allowed; choose one of {list(INDEX_METHODS)} "
                         "(the physical permutation is permute_reorder_)")
    chosen = None if layers is None else set(layers)
    available = {name for name, _ in quantized_layers(model)}
    if chosen is not None and chosen - available:
        raise ValueError(f"reorder_channels_: no quantized layer(s) {sorted(chosen - available)[:3]}")
    rows_out = []
    for name, layer in quantized_layers(model):
        if chosen is not None and name not in chosen:
            continue
        quantizer = layer.weight_quantizer
        n_v, n_h = quantizer.blocks
        out_channels = quantizer.weight_shape[0]
        row_ranges, _ = channel_ranges(layer.weight)
        before = _spread(row_ranges.cpu(), quantizer.row_groups.cpu())
        if (n_v, n_h) == (1, 1) or (n_h == 1 and n_v == out_channels):
            rows_out.append({"layer": name, "blocks": f"{n_v}x{n_h}", "rows_regrouped": False, "columns_regrouped": False,
                             "row_spread_before": before, "row_spread_after": before})
            continue
        row_groups, col_groups, columns_regrouped = reorder_groups(layer.weight.cpu(), (n_v, n_h), method, seed)
        quantizer.set_groups(row_groups, col_groups, weight=layer.weight)
        rows_out.append({"layer": name, "blocks": f"{n_v}x{n_h}", "rows_regrouped": 1 < n_v < out_channels,
                         "columns_regrouped": columns_regrouped, "row_spread_before": before,
                         "row_spread_after": _spread(row_ranges.cpu(), row_groups)})
    return pd.DataFrame(rows_out)


@torch.no_grad()
def permute_channels_(permutation: Sequence[int] | torch.Tensor, producers: Sequence[nn.Module],
                      consumers: Sequence[nn.Module]) -> None:
    """Physically permute a set of channels listed by hand: ``producers`` index them on their output side,
    ``consumers`` on their input side.

    Producers: the convolution / Linear that makes the channels, the BatchNorms after it, and
    depthwise convolutions in between (one group per channel). Consumers: the layers that read them.
    The caller must list every one, residual partners included; :func:`permute_reorder_` finds them
    from the graph instead (:func:`cpq_lib.ptq.channel_graph.channel_spaces`).
    """
    perm = torch.as_tensor(permutation, dtype=torch.long)
    if sorted(perm.tolist()) != list(range(perm.numel())):
        raise ValueError("permutation must contain every channel index exactly once")
    for module in producers:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            _permute_norm(module, perm)
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if module.weight.shape[0] != perm.numel():
                raise ValueError(f"producer has {module.weight.shape[0]} output channels, permutation has {perm.numel()}")
            _permute_rows(module, perm)
        else:
            raise ValueError(f"cannot permute the output channels of {type(module).__name__}")
    for module in consumers:
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or getattr(module, "groups", 1) != 1:
            raise ValueError(f"consumers must be ungrouped Conv2d / Linear layers, got {type(module).__name__}")
        if module.weight.shape[1] != perm.numel():
            raise ValueError(f"consumer has {module.weight.shape[1]} input channels, permutation has {perm.numel()}")
        _permute_columns(module, perm)


# --- physical, permutation-consistent reordering ---------------------------------------------------------

def _is_identity(groups: torch.Tensor) -> bool:
    return torch.equal(groups, torch.arange(groups.numel(), device=groups.device))


@torch.no_grad()
def _permute_rows(layer: nn.Module, perm: torch.Tensor) -> None:
    """Output channels of a Conv2d / Linear (or depthwise conv) in the order ``perm``; a quantizer follows exactly."""
    p = perm.to(layer.weight.device)
    layer.weight.copy_(layer.weight[p])
    if layer.bias is not None:
        layer.bias.copy_(layer.bias[p])
    quantizer = getattr(layer, "weight_quantizer", None)
    if quantizer is None:
        return
    quantizer.bits.copy_(quantizer.bits[p])
    quantizer.refresh_state()
    n_v = quantizer.blocks[0]
    if n_v == quantizer.weight_shape[0] and _is_identity(quantizer.row_groups):  # one scale per row: move the scales
        quantizer.scale.copy_(quantizer.scale[p])
        if quantizer.zero_point is not None:
            quantizer.zero_point.copy_(quantizer.zero_point[p])
    else:  # rows keep their block: the quantized function is unchanged
        quantizer.row_groups.copy_(quantizer.row_groups[p])


@torch.no_grad()
def _permute_columns(layer: nn.Module, perm: torch.Tensor, repeat: int = 1) -> None:
    """Input channels of a Conv2d / Linear in the order ``perm`` (``repeat`` columns per channel after a flatten)."""
    channels = perm.to(layer.weight.device)
    p = (channels[:, None] * repeat + torch.arange(repeat, device=channels.device)).flatten() if repeat > 1 else channels
    layer.weight.copy_(layer.weight[:, p])
    quantizer = getattr(layer, "weight_quantizer", None)
    if quantizer is not None:  # columns are (channel, kernel position) or (channel, flattened position), channel-major
        groups = quantizer.col_groups.view(perm.numel(), -1)
        quantizer.col_groups.copy_(groups[perm.to(groups.device)].flatten())


@torch.no_grad()
def _permute_norm(norm: nn.modules.batchnorm._BatchNorm, perm: torch.Tensor) -> None:
    for tensor in (norm.weight, norm.bias, norm.running_mean, norm.running_var):
        if tensor is not None:
            tensor.copy_(tensor[perm.to(tensor.device)])


@torch.no_grad()
def apply_space_permutation_(model: nn.Module, space: ChannelSpace, perm: torch.Tensor) -> None:
    """Permute one channel space in place (new channel i = old channel ``perm[i]``): the function is unchanged,
    and so is the fake-quantized function (scales move with their rows, or rows keep their block index)."""
    perm = torch.as_tensor(perm, dtype=torch.long).cpu()
    if sorted(perm.tolist()) != list(range(space.channels)):
        raise ValueError(f"permutation must hold each of the {space.channels} channel indices exactly once")
    if not space.permutable:
        raise ValueError(f"this channel space may not be permuted: {space.fixed[0]}")
    modules = dict(model.named_modules())
    for name in (*space.rows, *space.depthwise):
        _permute_rows(modules[name], perm)
    for name in space.norms:
        _permute_norm(modules[name], perm)
    for name in space.columns:
        _permute_columns(modules[name], perm, space.column_repeat.get(name, 1))


def _normalised(values: torch.Tensor) -> torch.Tensor:
    return values / values.max().clamp_min(1e-12)


@torch.no_grad()
def space_order(model: nn.Module, space: ChannelSpace, side: str = "both") -> torch.Tensor:
    """A permutation that sorts the space's channels by range, ascending (stable).

    The key of a channel is its normalised range (max |w| over the layer, divided by the layer's largest)
    averaged over the layers that index the space: as output channel (``rows``: producers and depthwise
    convolutions), as input channel (``columns``: readers), or both. Quantized layers decide where the
    space has any; otherwise every listed layer does.
    """
    if side not in ("rows", "columns", "both"):
        raise ValueError(f"side {side!r} is not allowed; choose rows, columns or both")
    modules = dict(model.named_modules())
    entries = []
    if side in ("rows", "both"):
        entries += [(name, "rows") for name in (*space.rows, *space.depthwise)]
    if side in ("columns", "both"):
        entries += [(name, "columns") for name in space.columns]
    if not entries:  # e.g. only readers, asked for rows: fall back to whatever indexes the space
        entries = [(name, "rows") for name in (*space.rows, *space.depthwise)] + [(name, "columns") for name in space.columns]
    quantized = [e for e in entries if isinstance(modules[e[0]], QuantizedLayer)]
    keys = []
    for name, kind in quantized or entries:
        weight = as_real(modules[name].weight.detach()).abs().cpu()
        if kind == "rows":
            keys.append(_normalised(weight.reshape(weight.shape[0], -1).amax(1)))
        else:
            per_column = weight.reshape(weight.shape[0], weight.shape[1], -1).amax(2).amax(0)
            keys.append(_normalised(per_column.view(space.channels, -1).amax(1)))
    if not keys:
        return torch.arange(space.channels)
    return torch.argsort(torch.stack(keys).mean(0), stable=True)


@torch.no_grad()
def permute_reorder_(model: nn.Module, example_input: torch.Tensor, side: str = "both",
                     followers: Sequence[nn.Module] = ()) -> pd.DataFrame:
    """PTQ-SL's reordering as a deployable network: permute every permutable channel space by range, then make
    every block-granular quantized layer's blocks contiguous and re-initialise its scales.

    ``example_input`` (a batch the model accepts) lets the graph analysis propagate shapes. Spaces that
    may not be permuted (model input and output, grouped convolutions, unknown operations) keep their
    order; the table says per layer whether its rows / columns were permuted and why not.
    ``followers`` (models with the same module names, e.g. the float model a scale search compares
    layer outputs with) get the same permutations, so layer outputs stay comparable channel by channel.
    """
    spaces = channel_spaces(model, example_input)
    rows_space = {name: s for s in spaces for name in (*s.rows, *s.depthwise)}
    cols_space = {name: s for s in spaces for name in s.columns}
    layers = quantized_layers(model)
    before = {name: _spread(channel_ranges(layer.weight)[0].cpu(), layer.weight_quantizer.row_groups.cpu())
              for name, layer in layers}
    for space in spaces:
        if space.permutable:
            order = space_order(model, space, side)
            for target in (model, *followers):
                apply_space_permutation_(target, space, order)
    rows_out = []
    for name, layer in layers:
        quantizer = layer.weight_quantizer
        n_v, n_h = quantizer.blocks
        out_channels = quantizer.weight_shape[0]
        if quantizer.granularity == "block":
            quantizer.set_groups(contiguous_groups(out_channels, n_v), contiguous_groups(quantizer.col_groups.numel(), n_h),
                                 weight=layer.weight)
        row_space = rows_space.get(name)
        col_space = row_space if name in (row_space.depthwise if row_space else ()) else cols_space.get(name)
        kept = [reason for space in (row_space, col_space) if space is not None for reason in space.fixed[:1]]
        rows_out.append({"layer": name, "blocks": f"{n_v}x{n_h}",
                         "rows_permuted": bool(row_space is not None and row_space.permutable),
                         "columns_permuted": bool(col_space is not None and col_space.permutable),
                         "row_spread_before": before[name],
                         "row_spread_after": _spread(channel_ranges(layer.weight)[0].cpu(), quantizer.row_groups.cpu()),
                         "kept_because": "; ".join(dict.fromkeys(kept))})
    return pd.DataFrame(rows_out)
