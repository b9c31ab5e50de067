"""Hessian traces of the loss per layer and per output channel, by Hutchinson's estimator.

HAWQ (Dong et al., HAWQ-V2 2020, HAWQ-V3 2021) ranks a layer's sensitivity by the trace of the loss
Hessian restricted to its weights, ``Tr(H_l)``, times the quantization perturbation. The trace is
never formed: for Rademacher probes ``v`` (entries +-1), ``E[v^T H v] = Tr(H)`` and, entry by entry,
``E[v * (H v)] = diag(H)``, so one Hessian-vector product per probe gives every layer's trace and
every output channel's (the sum of its diagonal entries) at once. One probe covers all layers jointly:
the cross-layer terms ``v_l^T H_lm v_m`` have expectation zero, so each block's estimate stays
unbiased (it only adds variance), and the cost is one Hessian-vector product per probe and batch
instead of one per layer.

Written here rather than taken from PyHessian (the reference implementation, not packaged on PyPI)
because cpq needs per-output-channel traces and a seeded, convergence-checked loop
over cpq's own batches; the arithmetic is a few lines of ``torch.autograd.grad``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
from torch import nn

from .space import AllocationError

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class TraceEstimate:
    """Estimated Hessian traces (of the mean loss over the given batches), with what they cost."""

    per_layer: dict[str, float]
    per_channel: dict[str, torch.Tensor]  # float64, one entry per output channel (row of the weight)
    probes: int
    hessian_vector_products: int
    seconds: float
    converged: bool  # the convergence rule stopped the loop (else: the probe cap)
    from_cache: bool = False  # read from a cache entry; ``seconds`` is what computing it took then

    def as_dict(self) -> dict:
        return {"per_layer": {k: round(v, 8) for k, v in self.per_layer.items()}, "probes": self.probes,
                "hessian_vector_products": self.hessian_vector_products, "seconds": round(self.seconds, 3),
                "converged": self.converged, "from_cache": self.from_cache}


def rademacher_like(tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """A +-1 tensor shaped like ``tensor``, drawn on the CPU from ``generator`` (the same on every device)."""
    signs = torch.randint(0, 2, tensor.shape, generator=generator, dtype=torch.int8).to(tensor.dtype) * 2 - 1
    return signs.to(tensor.device)


def hutchinson_traces(model: nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
                      parameters: dict[str, nn.Parameter], *, loss: Loss | None = None, max_probes: int = 200,
                      min_probes: int | None = None, tolerance: float = 1e-2, seed: int = 0) -> TraceEstimate:
    """Traces of the Hessian of ``loss`` (mean cross-entropy by default, averaged over ``batches``) for
    each named parameter, and per output channel.

    Stops after ``min_probes`` probes (default 8, or ``max_probes`` if fewer) once every layer's running mean moved by less than ``tolerance``
    (relative to its magnitude) with the last probe, or at ``max_probes``. The model must be a float
    model (second derivatives do not pass through fake quantizers' straight-through estimators); it
    runs in eval mode (BatchNorm from running statistics, so the loss is a function of the weights
    alone). Seeded: the probes come from a CPU generator seeded with ``seed``.
    """
    if isinstance(max_probes, bool) or not isinstance(max_probes, int) or max_probes < 1:
        raise AllocationError(f"max_probes must be an integer >= 1, got {max_probes!r}")
    min_probes = min(8, max_probes) if min_probes is None else min_probes
    if isinstance(min_probes, bool) or not isinstance(min_probes, int) or not 1 <= min_probes <= max_probes:
        raise AllocationError(f"min_probes must be an integer in 1..max_probes ({max_probes}), got {min_probes!r}")
    if not tolerance > 0:
        raise AllocationError(f"tolerance must be positive, got {tolerance!r}")
    if not parameters:
        raise AllocationError("no parameters to estimate Hessian traces for")
    batches = list(batches)
    if not batches:
        raise AllocationError("Hessian traces need at least one batch of training images")
    loss = loss or nn.functional.cross_entropy
    names, params = list(parameters), list(parameters.values())
    was_training = model.training
    model.eval()
    started = time.perf_counter()
    generator = torch.Generator().manual_seed(seed)
    sums = [torch.zeros(p.shape[0], dtype=torch.float64) for p in params]
    previous: list[float] | None = None
    probes = hvps = 0
    converged = False
    total_images = sum(len(labels) for _, labels in batches)
    try:
        while probes < max_probes:
            vectors = [rademacher_like(p, generator) for p in params]
            diag = [torch.zeros(p.shape[0], dtype=torch.float64) for p in params]
            for images, labels in batches:
                value = loss(model(images), labels) * (len(labels) / total_images)
                grads = torch.autograd.grad(value, params, create_graph=True)
                products = torch.autograd.grad(grads, params, grad_outputs=vectors)
                hvps += 1
                for i, (v, hv) in enumerate(zip(vectors, products)):
                    diag[i] += (v * hv).detach().double().reshape(v.shape[0], -1).sum(1).cpu()
            probes += 1
            for i, d in enumerate(diag):
                sums[i] += d
            means = [float(s.sum()) / probes for s in sums]
            if previous is not None and probes >= min_probes:
                change = max(abs(m - p) / max(abs(m), 1e-12) for m, p in zip(means, previous))
                if change < tolerance:
                    converged = True
                    break
            previous = means
    finally:
        model.train(was_training)
    per_channel = {name: s / probes for name, s in zip(names, sums)}
    return TraceEstimate({name: float(c.sum()) for name, c in per_channel.items()}, per_channel, probes, hvps,
                         time.perf_counter() - started, converged)


def exact_traces(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, parameters: dict[str, nn.Parameter],
                 loss: Loss | None = None) -> dict[str, torch.Tensor]:
    """Per-output-channel traces from the full Hessian's diagonal (one Hessian-vector product per
    parameter entry): the ground truth for small models, to test the estimator against."""
    loss = loss or nn.functional.cross_entropy
    params = list(parameters.values())
    was_training = model.training
    model.eval()
    try:
        grads = torch.autograd.grad(loss(model(images), labels), params, create_graph=True)
        out = {}
        for name, p, g in zip(parameters, params, grads):
            flat = g.reshape(-1)
            diagonal = torch.empty(flat.numel(), dtype=torch.float64)
            for k in range(flat.numel()):
                row = torch.autograd.grad(flat[k], p, retain_graph=True)[0].reshape(-1)
                diagonal[k] = float(row[k])
            out[name] = diagonal.reshape(p.shape[0], -1).sum(1)
    finally:
        model.train(was_training)
    return out


def perturbation_sensitivity(traces: torch.Tensor, squared_errors: torch.Tensor, params_per_channel: int) -> torch.Tensor:
    """HAWQ's ``Omega = Tr(H) / n * ||Q_b(W) - W||^2`` per channel: ``traces`` (channels,), the squared
    quantization error of each channel's weights at each candidate width ``squared_errors`` (channels,
    widths), ``n`` the parameters of one channel. Negative trace estimates (noise, or a saddle) count
    as zero sensitivity rather than as a reward for quantization error."""
    if squared_errors.shape[0] != traces.shape[0]:
        raise AllocationError(f"{traces.shape[0]} channel traces but {squared_errors.shape[0]} rows of errors")
    return traces.clamp_min(0.0).double()[:, None] / max(1, params_per_channel) * squared_errors.double()


def relative_error(estimate: float, exact: float) -> float:
    return abs(estimate - exact) / max(abs(exact), 1e-12) if math.isfinite(estimate) else math.inf
