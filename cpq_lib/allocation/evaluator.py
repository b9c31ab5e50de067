"""Validation accuracy of a per-channel bit assignment, fast enough for searches that try hundreds.

Searches see a :class:`~cpq_lib.data.SearchData` (no test split) and evaluate on a fixed, stratified
subset of the validation split, held in memory as ready float tensors (a lazily read data set decodes
it on every evaluation instead: memory stays flat). Setting a plan touches only the
layers whose bits changed, and per-channel scales come from a table computed once per (layer,
bit-width): a channel's scale depends only on its own weights and bit-width (per-channel, symmetric
grids), so the table gives exactly what ``WeightQuantizer.initialize`` would, without re-running the
MSE search of every layer on every evaluation. Quantized weights are then cached by the layers.

BatchNorm re-estimation (``bn_images``, on by default): a plan that lowers weights changes every
channel's output distribution, and BatchNorm statistics estimated for 8-bit weights then normalise the
wrong one; at 2 bits nearly every plan sits near chance and the search decides between noise. Each
evaluation therefore re-estimates the BatchNorm statistics of the plan on a fixed, seeded, stratified set
of training images (the same for every plan and every allocator), measures, and restores the running
statistics, so the model leaves every evaluation as it entered it. ``bn_images=0`` evaluates with the
statistics as they are (the reference's behaviour).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from ..data import SearchData, ready_batches
from ..devices import check_model_device
from ..quant import WeightQuantizer, quantized_layers
from ..quant.batchnorm import batchnorms, reestimate_bn_, restored_bn_statistics
from ..train import EvalResult, evaluate
from ..train.evaluate import memory_format_of
from .space import AllocationError, ChannelSpace


class SearchEvaluator:
    """Counts evaluations and their wall time; ``evaluate(bits)`` sets ``bits`` and measures accuracy."""

    def __init__(self, model: nn.Module, data: SearchData, images: int | None = None, seed: int = 0,
                 device: str | torch.device = "cpu", batch_size: int = 500, bn_images: int = 512) -> None:
        if not isinstance(data, SearchData):
            raise AllocationError("a search takes data.for_search() (training and validation splits only)")
        check_model_device(model, device, "SearchEvaluator")
        self.model = model.eval()
        self.space = ChannelSpace.of(model)
        self.layers = dict(quantized_layers(model))
        for name, layer in self.layers.items():
            q = layer.weight_quantizer
            if q.granularity != "channel" or not q.symmetric:
                raise AllocationError(f"layer {name!r}: searches need per-channel symmetric weight quantizers, "
                                      f"got granularity {q.granularity!r}, symmetric={q.symmetric}")
        subset = data.subset("val", images, seed)
        self.images = len(subset)
        fmt = memory_format_of(model)
        self.batches = ready_batches(subset, batch_size, device, fmt)
        if isinstance(bn_images, bool) or not isinstance(bn_images, int) or bn_images < 0:
            raise AllocationError(f"bn_images must be a number of training images >= 0 (0: no BatchNorm re-estimation), "
                                  f"got {bn_images!r}")
        self.bn_images = bn_images if batchnorms(model) else 0
        self.bn_batches = bn_batches(data, self.bn_images, seed, device, fmt) if self.bn_images else []
        self.num_classes = data.num_classes
        self.device = device
        self.evaluations = 0
        self.seconds = 0.0
        self._scales: dict[tuple[str, int], torch.Tensor] = {}
        # bit bookkeeping stays on the CPU (the searches build plans there); quantizer tensors stay on the model's device
        self._current = {name: layer.weight_quantizer.bits.detach().cpu().clone() for name, layer in self.layers.items()}
        self.set_bits(self.space.flatten(self._current), force=True)

    def _scale_table(self, name: str, bits: int) -> torch.Tensor:
        key = (name, bits)
        if key not in self._scales:
            layer = self.layers[name]
            q = layer.weight_quantizer
            probe = WeightQuantizer(q.weight_shape, bits, "channel", symmetric=True, init=q.init_method,
                                    grid=q.grid_name).to(layer.weight.device)
            probe.initialize(layer.weight)
            self._scales[key] = probe.scale.detach().clone()
        return self._scales[key]

    @torch.no_grad()
    def set_bits(self, bits: torch.Tensor, force: bool = False) -> None:
        """Give every quantized channel its bit-width (flat vector over :class:`ChannelSpace`)."""
        if bits.shape != (self.space.size,):
            raise AllocationError(f"expected {self.space.size} channel bit-widths, got shape {tuple(bits.shape)}")
        for name, new in self.space.split(bits.detach().cpu().long()).items():
            if not force and torch.equal(new, self._current[name]):
                continue
            q = self.layers[name].weight_quantizer
            scale = torch.empty_like(q.scale)
            for value in new.unique().tolist():
                rows = (new == value).to(scale.device)
                scale[rows] = self._scale_table(name, int(value))[rows]
            q.bits.copy_(new.to(q.bits.device))
            q.scale.copy_(scale)
            q.initialized.fill_(True)
            q.refresh_state()
            self._current[name] = new.clone()

    def measure(self) -> EvalResult:
        """Accuracy and loss of the model as it is now (BatchNorm re-estimated first, then restored)."""
        if not self.bn_batches:
            return evaluate(self.model, self.batches, self.num_classes, self.device)
        with restored_bn_statistics(self.model):
            reestimate_bn_(self.model, self.bn_batches, self.device)
            return evaluate(self.model, self.batches, self.num_classes, self.device)

    def evaluate(self, bits: torch.Tensor) -> EvalResult:
        started = time.perf_counter()
        self.set_bits(bits)
        result = self.measure()
        self.evaluations += 1
        self.seconds += time.perf_counter() - started
        return result

    def cost(self) -> dict[str, float]:
        return {"evaluations": self.evaluations, "evaluation_seconds": round(self.seconds, 3), "images": self.images,
                "bn_images": self.bn_images}


def bn_batches(data: SearchData, images: int, seed: int, device: str | torch.device,
               memory_format: torch.memory_format = torch.contiguous_format, batch_size: int = 256):
    """The fixed training images every evaluation re-estimates BatchNorm on, as ready batches (seeded, stratified)."""
    return ready_batches(data.subset("train", images, seed), batch_size, device, memory_format)
