"""HAWQ: bits by Hessian-aware sensitivity, solved exactly (Dong et al., HAWQ-V2 2020, HAWQ-V3 2021).

Sensitivity of a group (a layer, as HAWQ-V3; or an output channel, this package's variant) at width
b: ``Omega(b) = Tr(H) / n * ||Q_b(W) - W||^2``, the Hessian trace of the loss restricted to the
group's weights (Hutchinson's estimator on the float model, on the evaluator's fixed, seeded training
images) times the squared quantization error of its weights at b bits (the same per-channel scales
the evaluator uses). The widths are chosen by an integer program (:mod:`.solver`) minimising the summed
Omega within the budget every allocator shares; per layer, what one width per layer leaves of the
budget is spent channel by channel on the layers whose next width saves the most Omega per bit, as
the ``sensitivity`` allocator does. The plan is evaluated once, like every other allocator's.
"""

from __future__ import annotations

import copy

import numpy as np
import torch

from ..quant import WeightQuantizer, dequantize_, quantized_layers
from .baselines import spend_by_sensitivity
from .evaluator import SearchEvaluator
from .hessian import TraceEstimate, hutchinson_traces, perturbation_sensitivity
from .search import AllocationResult, SearchLog
from .solver import average_bits_budget, solve_assignment
from .space import AllocationError, Target

GRANULARITIES = ("layer", "channel")


def hessian_traces(evaluator: SearchEvaluator, max_probes: int, tolerance: float, seed: int) -> TraceEstimate:
    """Traces of the float twin of the evaluator's model (float weights, no quantizers) on its
    BatchNorm-re-estimation images: training images, fixed and seeded, never validation or test."""
    if not evaluator.bn_batches:
        raise AllocationError("hawq takes its Hessian traces on the evaluator's training images: set "
                              "allocation.bn_images > 0 (it is 512 by default)")
    twin = dequantize_(copy.deepcopy(evaluator.model), bake=False)
    names = [name for name, _ in quantized_layers(evaluator.model)]
    parameters = {name: twin.get_submodule(name).weight for name in names}
    for p in twin.parameters():
        p.requires_grad_(False)
    for p in parameters.values():
        p.requires_grad_(True)
    return hutchinson_traces(twin, evaluator.bn_batches, parameters, max_probes=max_probes, tolerance=tolerance, seed=seed)


@torch.no_grad()
def squared_errors(evaluator: SearchEvaluator, name: str, widths: list[int]) -> torch.Tensor:
    """(channels, widths): ``||Q_b(W_c) - W_c||^2`` of each output channel at each width."""
    layer = evaluator.layers[name]
    q = layer.weight_quantizer
    probe = WeightQuantizer(q.weight_shape, widths[0], "channel", symmetric=True, init=q.init_method,
                            grid=q.grid_name).to(layer.weight.device)
    weight = layer.weight.detach()
    columns = []
    for b in widths:
        probe.set_bits(b)
        probe.scale.copy_(evaluator._scale_table(name, b))
        probe.initialized.fill_(True)
        probe.refresh_state()
        columns.append(((probe(weight) - weight) ** 2).reshape(weight.shape[0], -1).sum(1).double().cpu())
    return torch.stack(columns, 1)


def hawq(evaluator: SearchEvaluator, target: Target, *, granularity: str = "layer", start_bits: int | None = None,
         min_bits: int = 1, max_probes: int = 200, tolerance: float = 1e-2, seed: int = 0, progress: bool = True,
         **_) -> AllocationResult:
    """Per-layer (HAWQ-V3) or per-channel bits minimising the summed Hessian-aware sensitivity."""
    if granularity not in GRANULARITIES:
        raise AllocationError(f"hawq granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    space = evaluator.space
    start = start_bits or target.start_bits()
    if not 1 <= min_bits <= start <= 16:
        raise AllocationError(f"hawq widths {min_bits}..{start} must lie in 1..16, lowest first")
    widths = list(range(min_bits, start + 1))
    traces = hessian_traces(evaluator, max_probes, tolerance, seed)
    errors = {name: squared_errors(evaluator, name, widths) for name in space.names}
    if granularity == "channel":
        omega = torch.cat([perturbation_sensitivity(traces.per_channel[name], errors[name], space.params_per_channel[i])
                           for i, name in enumerate(space.names)]).numpy()
        params = space.weights().numpy()
    else:
        omega = torch.stack([perturbation_sensitivity(torch.tensor([traces.per_layer[name]]), errors[name].sum(0, keepdim=True),
                                                      space.channels[i] * space.params_per_channel[i])[0]
                             for i, name in enumerate(space.names)]).numpy()
        params = np.array([space.channels[i] * space.params_per_channel[i] for i in range(len(space.names))], dtype=np.float64)
    assignment = solve_assignment(omega, [average_bits_budget(params, widths, target.max_bits)])
    chosen = [widths[k] for k in assignment.choice]
    if granularity == "channel":
        bits = torch.tensor(chosen, dtype=torch.long)
    else:
        bits = torch.cat([torch.full((space.channels[i],), chosen[i], dtype=torch.long) for i in range(len(space.names))])
        rise = {(i, b): float(omega[i, k]) for i in range(len(space.names)) for k, b in enumerate(widths)}
        bits = spend_by_sensitivity(space, bits, chosen, rise, target.max_bits, start)
    log = SearchLog(evaluator, f"hawq ({granularity})", progress, total=1)
    accuracy, _, _ = log.try_bits(bits, "final", "chosen plan")
    layer_traces = {name: round(value, 8) for name, value in traces.per_layer.items()}
    return log.result("hawq", bits, target, accuracy,
                      {"granularity": granularity, "start_bits": start, "min_bits": min_bits, "max_probes": max_probes,
                       "tolerance": tolerance, "seed": seed},
                      {"traces": layer_traces, "omega": round(assignment.objective, 10),
                       "trace_cost": {"probes": traces.probes, "hessian_vector_products": traces.hessian_vector_products,
                                      "seconds": round(traces.seconds, 3), "converged": traces.converged,
                                      "images": sum(len(labels) for _, labels in evaluator.bn_batches)}})
