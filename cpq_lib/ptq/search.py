"""PTQ-SL's scale search: per block, the candidate scale whose layer output is closest to full precision.

For every quantized layer, in network order:

1. Its input columns (im2col for convolutions, rows for Linear) are taken at ``positions`` sampled
   output positions from the calibration images, as the *partly quantized* model computes them
   (earlier layers already searched), and the full-precision model's output at the same positions
   is the target. Sampling output positions keeps the exact layer output there while cutting the
   cost by the image area: the search is a few matrix products, not 100 convolutions per layer.
2. Weight scales: candidates ``scale0 * (alpha + i * (beta - alpha) / n)`` for ``i = 0..n`` plus
   ``scale0`` itself (so the result is never worse than the max-based start by the metric). ``scale0``
   is the quantizer's max-based scale: ``max|w| / qmax`` on the narrow grid; on the full signed grid
   (``QuantConfig(weight_grid="full")``, the authors' ``[-2^(b-1), 2^(b-1) - 1]``) it is the authors'
   start ``max|w| / (2^(b-1) - 0.5)``. Output
   channels of different row groups are independent, so every row group picks its best candidate in
   the same pass (vectorised over candidates and blocks); column groups, which share output channels,
   are visited in turn (coordinate descent, ``n_H`` passes). Candidates go ``chunk`` at a time, which
   bounds memory at about ``chunk * out * (positions + in)`` floats.
3. The activation (input) scale is searched the same way with the weights fixed; weight and activation
   searches alternate for ``rounds`` rounds. A candidate replaces the current scale only when better by
   more than the arithmetic's noise, so every step keeps or lowers the metric.

Ties: the cosine metrics do not change when a row group's scale moves without changing its codes, so
many candidates score the same in exact arithmetic, and the CPU's summation order (another instruction
set, another thread count) separates them in the last bits. Values within a relative sqrt(eps) of the
best therefore count as equal and the first such candidate wins, as exact arithmetic would choose: the
chosen scales, and the layers searched after them, are then the same on every CPU.

Metrics (lower is better): ``cosine`` (1 - cosine similarity, per row group for weight blocks and
over the whole output for the activation scale), ``layer_cosine`` (the authors': 1 - cosine of the
whole layer output for every block; row groups then interact through the shared norm, so they are
visited in turn, exactly, from tables of each candidate's per-group dot products and norms),
``l2`` (squared error) and ``grad_l2`` (squared error weighted by the squared gradient of the loss
w.r.t. the layer output, PTQ4ViT-style, which needs labels in the calibration batches).

``ScaleSearchConfig.authors()`` with ``QuantConfig(weight_grid="full")`` is the authors' search:
full grid, their start, the layer-output cosine.

No library provides this search over an index-grouped block layout (AIMET, Brevitas and torchao
search per tensor or per channel and by weight error, not by layer output over blocks), hence our own.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Iterable

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ..devices import check_model_device
from ..progress import progress as progress_bar
from ..quant.modules import QuantizedLayer
from ..quant.primitives import as_real, fake_quantize
from ..quant.quantizers import ActivationQuantizer, WeightQuantizer
from ..quant.transform import quantized_layers

METRICS = ("cosine", "layer_cosine", "l2", "grad_l2")


@dataclass(frozen=True)
class ScaleSearchConfig:
    """Settings of the scale search (defaults: the paper's grid alpha 0.01, beta 1.2, n 100)."""

    metric: str = "cosine"
    alpha: float = 0.01
    beta: float = 1.2
    steps: int = 100            # n: candidates i = 0..n
    rounds: int = 2             # weight / activation alternations
    positions: int = 2048       # sampled output positions per layer (all of them if fewer exist)
    chunk: int = 16             # candidates evaluated at once
    search_activations: bool = True
    seed: int = 0

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise ValueError(f"metric: {self.metric!r} is not allowed; choose one of {list(METRICS)}")
        for name in ("steps", "rounds", "positions", "chunk"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name}: must be an integer >= 1, got {value!r}")
        for name in ("alpha", "beta"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name}: must be a finite number > 0, got {value!r}")
        if self.alpha >= self.beta:
            raise ValueError(f"alpha must be below beta (the candidate range scale0 * [alpha, beta]), got alpha={self.alpha}, beta={self.beta}")

    @classmethod
    def authors(cls, **overrides) -> "ScaleSearchConfig":
        """The authors' objective (layer-output cosine); pair it with ``QuantConfig(weight_grid="full")``."""
        return cls(**{"metric": "layer_cosine", **overrides})

    def factors(self) -> torch.Tensor:
        """Candidate multipliers of the start scale: the paper's grid, then 1.0 (the start itself)."""
        grid = self.alpha + torch.arange(self.steps + 1, dtype=torch.float64) * (self.beta - self.alpha) / self.steps
        return torch.cat([grid, torch.ones(1, dtype=torch.float64)]).to(torch.get_default_dtype())


class _StopForward(Exception):
    """Raised by a hook once the layer of interest has seen its input (the rest of the forward is not needed)."""


def _positions_per_batch(total_positions: int, batches: int) -> int:
    return max(1, math.ceil(total_positions / batches))


def _columns(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Input columns as (groups, cols per group, N * L): unfolded patches for a conv, rows for Linear."""
    if isinstance(layer, nn.Conv2d):
        if layer.padding_mode != "zeros" or isinstance(layer.padding, str):
            raise ValueError(f"scale search supports zero padding with explicit sizes, got padding={layer.padding!r}, "
                             f"padding_mode={layer.padding_mode!r}")
        unfolded = F.unfold(x, layer.kernel_size, layer.dilation, layer.padding, layer.stride)  # (N, C*kh*kw, L)
        n, cols, length = unfolded.shape
        per_group = cols // layer.groups
        return unfolded.view(n, layer.groups, per_group, length).permute(1, 2, 0, 3).reshape(layer.groups, per_group, n * length)
    return x.reshape(-1, x.shape[-1]).t().unsqueeze(0)  # Linear: (1, in, N * positions)


def _outputs_2d(layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
    """A layer output as (out, N * L), in the order of :func:`_columns`."""
    if isinstance(layer, nn.Conv2d):
        return y.permute(1, 0, 2, 3).reshape(y.shape[1], -1)
    return y.reshape(-1, y.shape[-1]).t()


def layer_output(weight_2d: torch.Tensor, columns: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Outputs (..., out, P) of weights (..., out, cols per group) on columns (..., g, cols per group, P).

    Leading dimensions broadcast (candidate weights against one input, or one weight against candidate inputs).
    """
    groups = columns.shape[-3]
    *lead, out, cols = weight_2d.shape
    grouped = weight_2d.reshape(*lead, groups, out // groups, cols)
    result = torch.einsum("...goc,...gcp->...gop", grouped, columns)
    result = result.reshape(*result.shape[:-3], out, columns.shape[-1])
    return result if bias is None else result + bias[:, None]


def _tolerance(values: torch.Tensor) -> float:
    """Relative gap below which two metric values are the same decision: sqrt of the precision's eps
    (1.5e-8 in float64, 3.5e-4 in float32), far above summation-order noise, far below real differences."""
    return torch.finfo(values.dtype).eps ** 0.5


def _first_best(metric: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(value, index) along dim 0 of the first candidate within the tolerance of the minimum."""
    lowest = metric.min(0).values
    index = (metric <= lowest + _tolerance(metric) * lowest.abs()).to(torch.uint8).argmax(0)  # first True
    return metric.gather(0, index.unsqueeze(0)).squeeze(0), index


def _clearly_below(value: torch.Tensor, best: torch.Tensor) -> torch.Tensor:
    """``value < best`` by more than the tolerance (a tie keeps the earlier candidate)."""
    return value < best - _tolerance(best) * best.abs()


def _rng(seed: int, layer: int, batch: int) -> torch.Generator:
    generator = torch.Generator()
    generator.manual_seed((seed * 1_000_003 + layer) * 1_000_003 + batch)
    return generator


def _sample_index(count: int, wanted: int, generator: torch.Generator) -> torch.Tensor | None:
    """Sorted positions to keep, or None for all of them."""
    if wanted >= count:
        return None
    return torch.randperm(count, generator=generator)[:wanted].sort().values


@torch.no_grad()
def _float_targets(float_model: nn.Module, names: list[str], batches: list, config: ScaleSearchConfig, device: str,
                   with_gradient: bool) -> tuple[dict[str, list], dict[str, torch.Tensor], dict[str, torch.Tensor | None]]:
    """Per layer: sampled positions per batch, float outputs there, and (for grad_l2) squared output gradients."""
    modules = dict(float_model.named_modules())
    per_batch = _positions_per_batch(config.positions, len(batches))
    picks: dict[str, list] = {name: [] for name in names}
    outputs: dict[str, list] = {name: [] for name in names}
    gradients: dict[str, list] = {name: [] for name in names}
    handles = []
    state: dict[str, int] = {}
    live: list[tuple[str, nn.Module, torch.Tensor, torch.Tensor | None]] = []  # this batch's outputs, for gradients

    def hook_for(index: int, name: str):
        def hook(module, inputs, output):
            flat = _outputs_2d(module, output)
            pick = _sample_index(flat.shape[1], per_batch, _rng(config.seed, index, state["batch"]))
            picks[name].append(pick)
            outputs[name].append(as_real((flat if pick is None else flat[:, pick]).detach()).cpu())
            if with_gradient:
                live.append((name, module, output, pick))
        return hook

    for index, name in enumerate(names):
        handles.append(modules[name].register_forward_hook(hook_for(index, name)))
    was_training = float_model.training
    float_model.eval()
    try:
        for batch_index, (images, labels) in enumerate(batches):
            state["batch"] = batch_index
            if with_gradient:  # d loss / d layer output, without touching the parameters' .grad
                live.clear()
                with torch.enable_grad():
                    images = images.to(device).requires_grad_(True)
                    loss = F.cross_entropy(float_model(images), labels.to(device), reduction="sum")
                    grads = torch.autograd.grad(loss, [output for _, _, output, _ in live])
                for (name, module, _, pick), grad in zip(live, grads):
                    flat = _outputs_2d(module, grad)
                    gradients[name].append(as_real(flat if pick is None else flat[:, pick]).cpu() ** 2)
                live.clear()
            else:
                float_model(images.to(device))
    finally:
        for handle in handles:
            handle.remove()
        float_model.train(was_training)
    target = {name: torch.cat(outputs[name], dim=1) for name in names}
    grads = {name: (torch.cat(gradients[name], dim=1) if with_gradient else None) for name in names}
    return picks, target, grads


@torch.no_grad()
def _quantized_inputs(model: nn.Module, layer: nn.Module, batches: list, picks: list, device: str) -> torch.Tensor:
    """The layer's raw input columns (before its activation quantizer) as the partly quantized model computes them."""
    collected = []

    def hook(module, inputs):
        columns = _columns(module, inputs[0])
        pick = picks[len(collected)]
        collected.append(as_real(columns if pick is None else columns[:, :, pick]).cpu())
        raise _StopForward

    handle = layer.register_forward_pre_hook(hook)
    try:
        for images, _ in batches:
            try:
                model(images.to(device))
            except _StopForward:
                pass
    finally:
        handle.remove()
    if len(collected) != len(batches):
        raise RuntimeError("scale search: a quantized layer was not called on every calibration batch")
    return torch.cat(collected, dim=2)


class _LayerObjective:
    """The metric of one layer's output against its float target, per row group or over the whole output."""

    def __init__(self, metric: str, target: torch.Tensor, gradient: torch.Tensor | None, row_groups: torch.Tensor,
                 groups: int) -> None:
        self.metric, self.target, self.row_groups, self.groups = metric, target, row_groups, groups
        self.weight = gradient if metric == "grad_l2" else None
        self.target_sq = self._per_group((target ** 2).sum(-1)) if metric in ("cosine", "layer_cosine") else None

    def _per_group(self, per_row: torch.Tensor) -> torch.Tensor:
        """(..., out) -> (..., groups) sums over the rows of each group."""
        out = torch.zeros(*per_row.shape[:-1], self.groups, dtype=per_row.dtype)
        return out.index_add_(-1, self.row_groups, per_row)

    def per_group(self, output: torch.Tensor) -> torch.Tensor:
        """Metric per row group for outputs (..., out, P) -> (..., groups)."""
        if self.metric == "cosine":
            dot = self._per_group((output * self.target).sum(-1))
            norm = self._per_group((output ** 2).sum(-1))
            return 1.0 - dot / (norm * self.target_sq).sqrt().clamp_min(1e-30)
        error = (output - self.target) ** 2
        if self.weight is not None:
            error = error * self.weight
        return self._per_group(error.sum(-1))

    def parts(self, output: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(dot with the target, squared norm) per row group of outputs (..., out, P) -> (..., groups) each."""
        return self._per_group((output * self.target).sum(-1)), self._per_group((output ** 2).sum(-1))

    def total(self, output: torch.Tensor) -> torch.Tensor:
        """Metric over the whole layer output (..., out, P) -> (...)."""
        if self.metric in ("cosine", "layer_cosine"):
            dot = (output * self.target).sum((-2, -1))
            norm = (output ** 2).sum((-2, -1)) * (self.target ** 2).sum()
            return 1.0 - dot / norm.sqrt().clamp_min(1e-30)
        error = (output - self.target) ** 2
        if self.weight is not None:
            error = error * self.weight
        return error.sum((-2, -1))


def _activation_grid(quantizer: ActivationQuantizer | None) -> tuple[int, int, torch.Tensor | None] | None:
    if quantizer is None or not quantizer.enabled or int(quantizer.bits) < 2:
        return None  # off, or 0/1 bit: nothing to search
    qmin, qmax = quantizer._grid()
    return qmin, qmax, (None if quantizer.symmetric else quantizer.zero_point.to(torch.get_default_dtype()).cpu())


def _quantize_columns(columns: torch.Tensor, quantizer: ActivationQuantizer | None, scale: torch.Tensor | None,
                      device: str) -> torch.Tensor:
    """Columns as the layer's input quantizer sees them, with ``scale`` in place of its own where searchable."""
    grid = _activation_grid(quantizer)
    if grid is not None:
        qmin, qmax, zero_point = grid
        return fake_quantize(columns, scale, zero_point, qmin, qmax)
    if quantizer is None or not quantizer.enabled:
        return columns
    return as_real(quantizer(columns.to(device))).cpu()  # 0 / 1-bit grids: the quantizer itself


class _WeightBlocks:
    """A weight quantizer's block layout on the CPU, for evaluating many candidate scales at once."""

    def __init__(self, quantizer: WeightQuantizer, weight: torch.Tensor) -> None:
        if not quantizer.symmetric:
            raise ValueError("scale search supports symmetric weight quantizers (PTQ-SL's setting); got an asymmetric one")
        self.weight = as_real(weight.detach()).cpu().reshape(weight.shape[0], -1)
        self.row_groups = quantizer.row_groups.cpu()
        self.col_groups = quantizer.col_groups.cpu()
        qmin, qmax, binary = quantizer.grid()
        rows = self.weight.shape[0]
        self.qmin, self.qmax = qmin.cpu().reshape(rows, 1), qmax.cpu().reshape(rows, 1)
        self.binary = None if binary is None else binary.cpu().reshape(rows, 1)

    def quantize(self, scale: torch.Tensor, columns: torch.Tensor | slice = slice(None)) -> torch.Tensor:
        """Fake-quantized weight (..., rows, cols) for block scales (..., n_V, n_H), restricted to ``columns``."""
        expanded = scale[..., self.row_groups, :][..., self.col_groups[columns]]
        return fake_quantize(self.weight[:, columns], expanded, None, self.qmin, self.qmax, self.binary)


def _search_weight_scales(blocks: _WeightBlocks, scale: torch.Tensor, scale0: torch.Tensor, inputs: torch.Tensor,
                          bias: torch.Tensor | None, objective: _LayerObjective, factors: torch.Tensor, chunk: int) -> torch.Tensor:
    """One pass of coordinate descent over column groups; every row group chooses in the same products."""
    scale = scale.clone()
    for column_group in range(scale.shape[1]):
        mask = blocks.col_groups == column_group
        if not bool(mask.any()):
            continue
        rest = blocks.quantize(scale).clone()
        rest[:, mask] = 0.0
        fixed = layer_output(rest, inputs, bias)  # every other column group's contribution
        part_inputs = inputs[:, mask] if inputs.shape[0] == 1 else None
        if objective.metric == "layer_cosine":
            scale = _layer_cosine_pass(blocks, scale, scale0, inputs, objective, factors, chunk, column_group, mask,
                                       fixed, part_inputs)
            continue
        best = objective.per_group(fixed + _masked_output(blocks.quantize(scale, mask), inputs, mask, part_inputs))
        for start in range(0, len(factors), chunk):
            factor = factors[start:start + chunk]
            candidates = scale.expand(len(factor), *scale.shape).clone()
            candidates[:, :, column_group] = scale0[:, column_group] * factor[:, None]
            output = fixed + _masked_output(blocks.quantize(candidates, mask), inputs, mask, part_inputs)
            metric = objective.per_group(output)  # (chunk, n_V)
            value, index = _first_best(metric)
            better = _clearly_below(value, best)
            scale[:, column_group] = torch.where(better, candidates[index, torch.arange(scale.shape[0]), column_group],
                                                 scale[:, column_group])
            best = torch.where(better, value, best)
    return scale


def _layer_cosine_pass(blocks: _WeightBlocks, scale: torch.Tensor, scale0: torch.Tensor, inputs: torch.Tensor,
                       objective: _LayerObjective, factors: torch.Tensor, chunk: int, column_group: int,
                       mask: torch.Tensor, fixed: torch.Tensor, part_inputs: torch.Tensor | None) -> torch.Tensor:
    """One column group under the whole-output cosine: row groups in turn, each candidate scored exactly.

    Rows of group g depend only on scale[g, column_group] here, so one pass over the candidates gives
    every group's dot product and norm per candidate; the whole-output cosine of changing group g alone
    is then arithmetic, and groups are visited in order (coordinate descent, never worse).
    """
    dot_now, norm_now = objective.parts(fixed + _masked_output(blocks.quantize(scale, mask), inputs, mask, part_inputs))
    dots, norms = [], []
    for start in range(0, len(factors), chunk):
        factor = factors[start:start + chunk]
        candidates = scale.expand(len(factor), *scale.shape).clone()
        candidates[:, :, column_group] = scale0[:, column_group] * factor[:, None]
        dot, norm = objective.parts(fixed + _masked_output(blocks.quantize(candidates, mask), inputs, mask, part_inputs))
        dots.append(dot)
        norms.append(norm)
    dots, norms = torch.cat(dots), torch.cat(norms)  # (candidates, n_V)
    target = objective.target_sq.sum()
    scale = scale.clone()
    total_dot, total_norm = dot_now.sum(), norm_now.sum()
    for group in range(scale.shape[0]):
        rest_dot, rest_norm = total_dot - dot_now[group], total_norm - norm_now[group]
        metric = 1.0 - (rest_dot + dots[:, group]) / ((rest_norm + norms[:, group]) * target).sqrt().clamp_min(1e-30)
        current = 1.0 - total_dot / (total_norm * target).sqrt().clamp_min(1e-30)
        value, index = _first_best(metric)
        if _clearly_below(value, current):
            scale[group, column_group] = scale0[group, column_group] * factors[index]
            total_dot, total_norm = rest_dot + dots[index, group], rest_norm + norms[index, group]
            dot_now[group], norm_now[group] = dots[index, group], norms[index, group]
    return scale


def _masked_output(weight_part: torch.Tensor, inputs: torch.Tensor, mask: torch.Tensor, part_inputs: torch.Tensor | None) -> torch.Tensor:
    """Output of the masked columns only: (..., rows, masked cols) against the matching input rows."""
    if part_inputs is not None:
        return layer_output(weight_part, part_inputs, None)
    full = torch.zeros(*weight_part.shape[:-1], mask.numel(), dtype=weight_part.dtype)
    full[..., mask] = weight_part
    return layer_output(full, inputs, None)


def _search_activation_scale(quantizer: ActivationQuantizer, columns: torch.Tensor, weight_q: torch.Tensor,
                             bias: torch.Tensor | None, objective: _LayerObjective, start: torch.Tensor,
                             current: torch.Tensor, factors: torch.Tensor, chunk: int) -> tuple[torch.Tensor, torch.Tensor]:
    qmin, qmax, zero_point = _activation_grid(quantizer)
    best_scale = current.clone()
    best = objective.total(layer_output(weight_q, fake_quantize(columns, current, zero_point, qmin, qmax), bias))
    for begin in range(0, len(factors), chunk):
        candidates = start * factors[begin:begin + chunk]
        quantized = fake_quantize(columns.unsqueeze(0), candidates.view(-1, 1, 1, 1), zero_point, qmin, qmax)
        metric = objective.total(layer_output(weight_q, quantized, bias))
        value, index = _first_best(metric)
        if _clearly_below(value, best):
            best, best_scale = value, candidates[index].clone()
    return best_scale, best


def search_scales_(model: nn.Module, float_model: nn.Module, calibration: Iterable, config: ScaleSearchConfig | None = None,
                   device: str = "cpu", progress: bool = True) -> pd.DataFrame:
    """Search every quantized layer's weight (and input) scales in place; returns a table per layer.

    ``model`` is a quantized copy of ``float_model`` (same layer names), calibrated, on ``device``;
    ``calibration`` yields (images, labels) from the training split. The table gives the metric at the
    max-based start and after the search (both on the same sampled positions and inputs), the mean
    chosen weight-scale factor, the activation factor and the seconds spent.
    """
    config = config or ScaleSearchConfig()
    check_model_device(model, device, "search_scales_")
    check_model_device(float_model, device, "search_scales_")
    batches = list(calibration)
    if not batches:
        raise ValueError("scale search: calibration data is empty")
    layers = quantized_layers(model)
    if not layers:
        raise ValueError("scale search: the model has no quantized layers (call quantize_ first)")
    float_names = dict(float_model.named_modules())
    missing = [name for name, _ in layers if name not in float_names]
    if missing:
        raise ValueError(f"scale search: float model has no layer(s) {missing[:3]}; pass the model quantize_ was applied to a copy of")
    for name, layer in layers:
        if not layer.weight_quantizer.symmetric:
            raise ValueError(f"scale search supports symmetric weight quantizers (PTQ-SL's setting); layer {name!r} is asymmetric")
    names = [name for name, _ in layers]
    picks, targets, gradients = _float_targets(float_model, names, batches, config, device, config.metric == "grad_l2")
    factors = config.factors()
    was_training = model.training
    model.eval()
    rows = []
    try:
        for name, layer in progress_bar(layers, progress, desc="scale search"):
            rows.append(_search_layer(model, name, layer, batches, picks[name], targets[name], gradients[name], config,
                                      factors, device))
    finally:
        model.train(was_training)
    return pd.DataFrame(rows)


@torch.no_grad()
def _search_layer(model: nn.Module, name: str, layer: QuantizedLayer, batches: list, picks: list, target: torch.Tensor,
                  gradient: torch.Tensor | None, config: ScaleSearchConfig, factors: torch.Tensor, device: str) -> dict:
    started = time.perf_counter()
    quantizer = layer.weight_quantizer
    columns = _quantized_inputs(model, layer, batches, picks, device)
    blocks = _WeightBlocks(quantizer, layer.weight)
    bias = None if layer.bias is None else as_real(layer.bias.detach()).cpu()
    n_v = quantizer.blocks[0]
    objective = _LayerObjective(config.metric, target, gradient, blocks.row_groups, n_v)
    scale0 = as_real(quantizer.scale.detach()).cpu().clone()
    scale = scale0.clone()
    act = layer.input_quantizer
    act_grid = _activation_grid(act) if config.search_activations else None
    act_start = as_real(act.scale.detach()).cpu().clone() if act is not None else None
    act_scale = act_start.clone() if act_start is not None else None

    def inputs_now() -> torch.Tensor:
        return _quantize_columns(columns, act, act_scale, device)

    def total_metric() -> float:
        return float(objective.total(layer_output(blocks.quantize(scale), inputs_now(), bias)))

    start_metric = total_metric()
    for _ in range(config.rounds):
        scale = _search_weight_scales(blocks, scale, scale0, inputs_now(), bias, objective, factors, config.chunk)
        if act_grid is not None:
            act_scale, _ = _search_activation_scale(act, columns, blocks.quantize(scale), bias, objective, act_start,
                                                   act_scale, factors, config.chunk)
    end_metric = total_metric()
    if end_metric > start_metric:  # weight blocks choose by their row group's metric; the layer total rules
        scale, act_scale, end_metric = scale0, act_start, start_metric
    quantizer.scale.copy_(scale.to(quantizer.scale.device))
    if act_grid is not None:
        act.scale.copy_(act_scale.to(act.scale.device))
    return {"layer": name, "metric": config.metric, "metric_start": start_metric, "metric_end": end_metric,
            "weight_factor_mean": float((scale / scale0.clamp_min(1e-30)).mean()),
            "act_factor": float(act_scale / act_start) if act_grid is not None else float("nan"),
            "positions": int(target.shape[1]), "seconds": time.perf_counter() - started}
