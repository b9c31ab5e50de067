"""HAWQ: bits by Hessian-aware sensitivity, solved exactly (Dong et al., HAWQ-V2 2020, HAWQ-V3 2021).

Sensitivity of a group (a layer, as HAWQ-V3; or an output channel, this package's variant) at width
b: ``Omega(b) = Tr(H) / n * ||Q_b(W) - W||^2``, the Hessian trace of the loss restricted to the
group's weights (Hutchinson's estimator on the float model, on the evaluator's fixed, seeded training
images) times the squared quantization error of its weights at b bits (the same per-channel scales
the evaluator uses). The widths are chosen by an integer program (:mod:`.solver`) minimising the summed
Omega within the budget every allocator shares (and BitOPs and bytes where the target gives them); per
layer, what one width per layer leaves of the budget is spent channel by channel on the layers whose next width saves the most Omega per bit, as
the ``sensitivity`` allocator does. The plan is evaluated once, like every other allocator's.

Class-aware (``class_weights="loss"``, this package's step beyond HAWQ, per channel): one trace per
class, of that class's loss on its own training images, combined as a weighted mean with weights
proportional to the float model's per-class validation loss, so channels the hardest classes' losses
are curved in get the bits. Equal weights give back the plain per-channel trace (the class-balanced
training images' mean loss is the mean of the per-class losses): that is the ablation, ``hawq_channel``.
"""

from __future__ import annotations

import copy
import os

import numpy as np
import torch
from torch import nn

from ..quant import WeightQuantizer, dequantize_, quantized_layers
from .baselines import spend_by_sensitivity
from .evaluator import SearchEvaluator
from .hessian import TraceEstimate, hutchinson_traces, perturbation_sensitivity
from .search import AllocationResult, SearchLog
from .budgets import ChannelBudget, extra_budgets
from .solver import Budget, average_bits_budget, solve_assignment
from .trace_cache import cached_traces
from .space import AllocationError, Target, candidate_widths

GRANULARITIES = ("layer", "channel")


CLASS_WEIGHTS = (None, "loss")


def float_twin(evaluator: SearchEvaluator) -> tuple[nn.Module, dict[str, nn.Parameter]]:
    """The evaluator's model with float weights and no quantizers, and its quantized layers' weights
    (the only parameters that take gradients)."""
    twin = dequantize_(copy.deepcopy(evaluator.model), bake=False)
    parameters = {name: twin.get_submodule(name).weight for name, _ in quantized_layers(evaluator.model)}
    for p in twin.parameters():
        p.requires_grad_(False)
    for p in parameters.values():
        p.requires_grad_(True)
    return twin, parameters


def _training_batches(evaluator: SearchEvaluator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    if not evaluator.bn_batches:
        raise AllocationError("hawq takes its Hessian traces on the evaluator's training images: set "
                              "allocation.bn_images > 0 (it is 512 by default)")
    return evaluator.bn_batches


def hessian_traces(evaluator: SearchEvaluator, max_probes: int, tolerance: float, seed: int,
                   cache_dir: str | os.PathLike | None = None) -> TraceEstimate:
    """Traces of the float twin on the evaluator's BatchNorm-re-estimation images: training images,
    fixed, seeded and class-balanced, never validation or test. Read from ``cache_dir`` when made there."""
    twin, parameters = float_twin(evaluator)
    batches = _training_batches(evaluator)
    return cached_traces(cache_dir, "model", twin, batches, {"max_probes": max_probes, "tolerance": tolerance, "seed": seed},
                         lambda: hutchinson_traces(twin, batches, parameters, max_probes=max_probes,
                                                   tolerance=tolerance, seed=seed))


def class_traces(evaluator: SearchEvaluator, max_probes: int, tolerance: float, seed: int,
                 cache_dir: str | os.PathLike | None = None) -> dict[int, TraceEstimate]:
    """One trace estimate per class, of the loss on that class's training images only."""
    twin, parameters = float_twin(evaluator)
    batches = _training_batches(evaluator)

    def compute() -> dict[int, TraceEstimate]:
        images = torch.cat([x for x, _ in batches])
        labels = torch.cat([y for _, y in batches])
        out = {}
        for c in sorted(set(labels.tolist())):
            rows = labels == c
            out[c] = hutchinson_traces(twin, [(images[rows], labels[rows])], parameters, max_probes=max_probes,
                                       tolerance=tolerance, seed=seed * 1000 + c)
        return out

    return cached_traces(cache_dir, "per-class", twin, batches,
                         {"max_probes": max_probes, "tolerance": tolerance, "seed": seed}, compute)


@torch.no_grad()
def validation_class_losses(evaluator: SearchEvaluator, num_classes: int) -> torch.Tensor:
    """The float twin's mean cross-entropy per class on the evaluator's validation images."""
    twin, _ = float_twin(evaluator)
    twin.eval()
    sums = torch.zeros(num_classes, dtype=torch.float64)
    counts = torch.zeros(num_classes, dtype=torch.float64)
    for images, labels in evaluator.batches:
        losses = nn.functional.cross_entropy(twin(images), labels, reduction="none").double().cpu()
        sums.index_add_(0, labels.cpu(), losses)
        counts.index_add_(0, labels.cpu(), torch.ones_like(losses))
    return sums / counts.clamp_min(1)


def weighted_class_traces(traces: dict[int, TraceEstimate], weights: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per channel: the weighted mean over classes of the per-class traces."""
    classes = sorted(traces)
    w = weights[classes].double()
    w = w / w.sum()
    names = list(traces[classes[0]].per_channel)
    return {name: sum(float(w[i]) * traces[c].per_channel[name] for i, c in enumerate(classes)) for name in names}


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


def group_budget(budget: ChannelBudget, space, granularity: str, widths: list[int]) -> Budget:
    """A channel budget (BitOPs, bytes) as a linear budget over the groups' widths."""
    per_bit = budget.per_bit.numpy()
    if granularity == "layer":
        per_bit = np.array([per_bit[space.layer_slice(name)].sum() for name in space.names])
    return Budget(budget.name, per_bit[:, None] * np.asarray(widths, dtype=np.float64)[None, :], budget.limit)


def hawq(evaluator: SearchEvaluator, target: Target, *, granularity: str = "layer", class_weights: str | None = None,
         start_bits: int | None = None, min_bits: int = 1, max_probes: int = 200, tolerance: float = 1e-2, seed: int = 0,
         trace_cache: str | os.PathLike | None = None, progress: bool = True, **_) -> AllocationResult:
    """Per-layer (HAWQ-V3) or per-channel bits minimising the summed Hessian-aware sensitivity;
    ``class_weights="loss"``: per-class traces weighted by the float model's per-class validation loss.
    ``trace_cache``: a folder where runs sharing model, images and settings compute the traces once."""
    if granularity not in GRANULARITIES:
        raise AllocationError(f"hawq granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}")
    if class_weights not in CLASS_WEIGHTS:
        raise AllocationError(f"hawq class_weights must be None or 'loss', got {class_weights!r}")
    space = evaluator.space
    widths = candidate_widths("hawq", target, min_bits, start_bits)
    start = widths[-1]
    details: dict = {}
    log = SearchLog(evaluator, f"hawq ({granularity})", progress, total=1)  # started before the traces: its seconds include them
    if class_weights is None:
        traces = hessian_traces(evaluator, max_probes, tolerance, seed, trace_cache)
        per_channel, per_layer = traces.per_channel, traces.per_layer
        estimates = [traces]
    else:
        by_class = class_traces(evaluator, max_probes, tolerance, seed, trace_cache)
        losses = validation_class_losses(evaluator, evaluator.num_classes)
        per_channel = weighted_class_traces(by_class, losses)
        per_layer = {name: float(values.sum()) for name, values in per_channel.items()}
        estimates = list(by_class.values())
        details["class_weights"] = {str(c): round(float(losses[c]), 6) for c in by_class}
    errors = {name: squared_errors(evaluator, name, widths) for name in space.names}
    if granularity == "channel":
        omega = torch.cat([perturbation_sensitivity(per_channel[name], errors[name], space.params_per_channel[i])
                           for i, name in enumerate(space.names)]).numpy()
        params = space.weights().numpy()
    else:
        omega = torch.stack([perturbation_sensitivity(torch.tensor([per_layer[name]]), errors[name].sum(0, keepdim=True),
                                                      space.channels[i] * space.params_per_channel[i])[0]
                             for i, name in enumerate(space.names)]).numpy()
        params = np.array([space.channels[i] * space.params_per_channel[i] for i in range(len(space.names))], dtype=np.float64)
    extra = extra_budgets(evaluator, target)
    budgets = [average_bits_budget(params, widths, target.max_bits)] + [group_budget(e, space, granularity, widths) for e in extra]
    assignment = solve_assignment(omega, budgets)
    chosen = [widths[k] for k in assignment.choice]
    if granularity == "channel":
        bits = torch.tensor(chosen, dtype=torch.long)
    else:
        bits = torch.cat([torch.full((space.channels[i],), chosen[i], dtype=torch.long) for i in range(len(space.names))])
        rise = {(i, b): float(omega[i, k]) for i in range(len(space.names)) for k, b in enumerate(widths)}
        bits = spend_by_sensitivity(space, bits, chosen, rise, target.max_bits, start, extra)
    accuracy, _, _ = log.try_bits(bits, "final", "chosen plan")
    details.update({
        "traces": {name: round(value, 8) for name, value in per_layer.items()}, "omega": round(assignment.objective, 10),
        "trace_cost": {"estimates": len(estimates), "probes": sum(e.probes for e in estimates),
                       "hessian_vector_products": sum(e.hessian_vector_products for e in estimates),
                       "seconds": round(sum(e.seconds for e in estimates), 3), "converged": all(e.converged for e in estimates),
                       "from_cache": all(e.from_cache for e in estimates),
                       "images": sum(len(labels) for _, labels in evaluator.bn_batches)}})
    return log.result("hawq", bits, target, accuracy,
                      {"granularity": granularity, "class_weights": class_weights, "start_bits": start, "min_bits": min_bits,
                       "max_probes": max_probes, "tolerance": tolerance, "seed": seed}, details)
