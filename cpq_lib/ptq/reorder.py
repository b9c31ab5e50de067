"""PTQ-SL's channel reordering: put channels of similar range into the same block.

We keep the weights where they are and change which block each row (output channel) and column
(input channel) belongs to: the quantizer's ``row_groups`` / ``col_groups`` index vectors. Sorting
channels by range and cutting the sorted order into contiguous, nearly equal groups (``sort``) gives
exactly the blocks a physical permutation followed by contiguous blocks would give (the test suite
checks this against :func:`permute_channels_`), yet needs no permutation of BatchNorm, consumers or
residual partners: every tensor added together keeps its order, the network computes the same
function, and the exported model and its ``BitPlan`` (bits per output channel) are unchanged.

``kmeans`` clusters the channels' log-ranges instead (scikit-learn's KMeans, seeded): groups of
unequal size that follow gaps in the range distribution. Only the index layout can express these
(a permutation plus equal blocks cannot), which is why ``sort`` is the default: it is what a
hardware kernel with equal contiguous blocks can run after a one-off permutation.

Columns are grouped by input channel (a channel's kh x kw columns stay together), by the channel's
range over the whole layer; when a layer has fewer input channels (per convolution group) than
column groups, its column grouping is left contiguous and the returned table says so.
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import torch
from torch import nn

from ..quant.primitives import as_real
from ..quant.quantizers import contiguous_groups
from ..quant.transform import quantized_layers

REORDER_METHODS = ("sort", "kmeans")


def _groups_from_values(values: torch.Tensor, groups: int, method: str, seed: int) -> torch.Tensor:
    """Group index per entry: entries of similar value share a group (0 = smallest values)."""
    count = values.numel()
    if method == "sort":
        order = torch.argsort(values, stable=True)
        assignment = torch.empty(count, dtype=torch.long)
        assignment[order] = contiguous_groups(count, groups)
        return assignment
    from sklearn.cluster import KMeans

    logs = torch.log(values.double().clamp_min(1e-12)).numpy().reshape(-1, 1)
    distinct = len(np.unique(logs))
    if distinct < groups:  # fewer distinct ranges than groups: clustering cannot fill them, sorting can
        return _groups_from_values(values, groups, "sort", seed)
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


def reorder_groups(weight: torch.Tensor, blocks: tuple[int, int], method: str = "sort", seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Row and column group vectors for ``blocks`` = (n_V, n_H) that gather channels of similar range.

    Returns (row_groups, col_groups, columns_regrouped): column groups cover the flattened input
    columns (in x kh x kw); they stay contiguous when there are fewer input channels than groups.
    """
    if method not in REORDER_METHODS:
        raise ValueError(f"reorder method {method!r} is not allowed; choose one of {list(REORDER_METHODS)}")
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
def reorder_channels_(model: nn.Module, method: str = "sort", seed: int = 0, layers: Iterable[str] | None = None) -> pd.DataFrame:
    """Regroup every block-granular quantized layer (or those named in ``layers``) by channel range.

    Weight scales are re-initialised for the new blocks (by each quantizer's own init method); layers
    with one row group and one column group, or one group per channel, are left alone. Returns a table
    per layer: blocks, whether rows / columns were regrouped, and the mean within-group range spread
    (max / min channel range) of the rows before and after.
    """
    if method not in REORDER_METHODS:
        raise ValueError(f"reorder method {method!r} is not allowed; choose one of {list(REORDER_METHODS)}")
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
    """Physically permute a set of channels: ``producers`` index them on their output side, ``consumers`` on their input side.

    Producers: the convolution / Linear that makes the channels, the BatchNorms after it, and
    depthwise convolutions in between (one group per channel). Consumers: the layers that read them.
    With every producer and consumer of the channels listed, the network computes the same function;
    channels that feed a residual addition need every tensor of that addition permuted alike, which is
    why the reordering itself uses index groups instead (see the module docstring).
    """
    perm = torch.as_tensor(permutation, dtype=torch.long)
    if sorted(perm.tolist()) != list(range(perm.numel())):
        raise ValueError("permutation must contain every channel index exactly once")
    for module in producers:
        if isinstance(module, nn.modules.batchnorm._BatchNorm):
            for tensor in (module.weight, module.bias, module.running_mean, module.running_var):
                if tensor is not None:
                    tensor.copy_(tensor[perm.to(tensor.device)])
        elif isinstance(module, (nn.Conv2d, nn.Linear)):
            if module.weight.shape[0] != perm.numel():
                raise ValueError(f"producer has {module.weight.shape[0]} output channels, permutation has {perm.numel()}")
            module.weight.copy_(module.weight[perm.to(module.weight.device)])
            if module.bias is not None:
                module.bias.copy_(module.bias[perm.to(module.bias.device)])
        else:
            raise ValueError(f"cannot permute the output channels of {type(module).__name__}")
    for module in consumers:
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or getattr(module, "groups", 1) != 1:
            raise ValueError(f"consumers must be ungrouped Conv2d / Linear layers, got {type(module).__name__}")
        if module.weight.shape[1] != perm.numel():
            raise ValueError(f"consumer has {module.weight.shape[1]} input channels, permutation has {perm.numel()}")
        module.weight.copy_(module.weight[:, perm.to(module.weight.device)])
