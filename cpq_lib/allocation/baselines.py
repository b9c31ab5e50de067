"""Baseline allocators: uniform bits, random bits (the sanity floor), and per-layer sensitivity.

``sensitivity`` is the strong non-class baseline, in the style of AIMET's automatic mixed precision:
phase 1 measures, for every quantized layer and bit-width 1..N, the validation loss with only that
layer lowered (the others at 8 bits); phase 2 takes the loss rises as additive (as AIMET and HAWQ do)
and picks one bit-width per layer that minimises their sum within the budget, exactly, by merging
Pareto fronts (a greedy "lower the cheapest layer" can strand budget when layers are few and unequal);
what one width per layer leaves of the budget is then spent channel by channel on the layers whose next
width saves the most loss per bit (every allocator of a comparison spends the same budget).
The table is measured once; the chosen plan is evaluated once.
"""

from __future__ import annotations

import math

import torch


import numpy as np

from .budgets import ChannelBudget, extra_budgets, within
from .evaluator import SearchEvaluator
from .search import AllocationResult, SearchLog
from .solver import Budget, solve_assignment
from .space import AllocationError, Target


def fill_to_budget(space, bits: torch.Tensor, limit: float, high: int, extra: list[ChannelBudget] = ()) -> torch.Tensor:
    """Spend what is left of the budget from below: raise whole layers to ``high`` bits, largest layer first,
    while the average stays at most ``limit`` (and every ``extra`` budget holds); then, if a layer does not
    fit whole, its channels in index order (so every allocator spends about the same budget; see the
    comparison's equal-budget rule)."""
    bits = bits.clone()
    weights = space.weights()
    total = float(weights.sum())
    spent = float((bits.double() * weights).sum())
    order = sorted(range(len(space.names)), key=lambda i: (-space.channels[i] * space.params_per_channel[i], i))
    for index in order:
        rows = slice(space.offsets[index], space.offsets[index + 1])
        added = float(((high - bits[rows]).clamp_min(0).double() * weights[rows]).sum())
        if added > 0 and spent + added <= limit * total + 1e-9:
            trial = bits.clone()
            trial[rows] = torch.clamp_min(bits[rows], high)
            if within(extra, trial):
                bits, spent = trial, spent + added
    for channel in range(space.size):
        added = float(max(0, high - int(bits[channel])) * weights[channel])
        if added > 0 and spent + added <= limit * total + 1e-9:
            trial = bits.clone()
            trial[channel] = high
            if within(extra, trial):
                bits, spent = trial, spent + added
    return bits


def uniform(evaluator: SearchEvaluator, target: Target, *, progress: bool = True, **_) -> AllocationResult:
    """The same bits everywhere; the rest of the budget (up to its maximum, the target plus slack) raises
    whole layers, largest first, to the next width, then single channels (:func:`fill_to_budget`)."""
    space = evaluator.space
    extra = extra_budgets(evaluator, target)
    low = max(1, math.floor(target.max_bits + 1e-9))
    while low > 1 and not within(extra, space.uniform(low)):  # a BitOPs or size budget tighter than the bits
        low -= 1
    if not within(extra, space.uniform(low)):
        raise AllocationError(f"uniform allocation cannot meet the budgets with {low} bit(s) everywhere")
    bits = fill_to_budget(space, space.uniform(low), target.max_bits, low + 1, extra)
    log = SearchLog(evaluator, "uniform", progress, total=1)
    accuracy, _, _ = log.try_bits(bits, "final", f"{space.average(bits):.3f} bits")
    return log.result("uniform", bits, target, accuracy, {})


def random_bits(evaluator: SearchEvaluator, target: Target, *, seed: int = 0, spread: int = 1, min_bits: int = 1,
                progress: bool = True, **_) -> AllocationResult:
    """Per-channel bits drawn uniformly from round(target) +- ``spread`` (at least ``min_bits``), then
    nudged channel by random channel until the average lies within the budget, then random channels
    raised while they fit, so the budget is spent up to its maximum (seeded)."""
    space = evaluator.space
    extra = extra_budgets(evaluator, target)
    generator = torch.Generator().manual_seed(seed)
    centre = max(min_bits, round(target.weight_bits))
    low, high = max(min_bits, centre - spread), centre + spread
    bits = torch.randint(low, high + 1, (space.size,), generator=generator)
    weights = space.weights()
    total = float(weights.sum())
    average = float((bits.double() * weights).sum()) / total
    while average > target.max_bits or not within(extra, bits):  # too many bits: lower random channels that can go lower
        candidates = torch.nonzero(bits > low).flatten()
        if candidates.numel() == 0:
            raise AllocationError(f"random allocation cannot reach {target.max_bits:.2f} bits with at least {low} per channel")
        pick = int(candidates[torch.randint(candidates.numel(), (1,), generator=generator)])
        bits[pick] -= 1
        average -= float(weights[pick]) / total
    while True:  # room left: raise random channels while they fit under the budget's maximum
        fits = (bits < high) & (average + weights / total <= target.max_bits + 1e-12)
        for budget in extra:
            fits &= budget.spent(bits) + budget.per_bit <= budget.limit * (1 + 1e-12)
        candidates = torch.nonzero(fits).flatten()
        if candidates.numel() == 0:
            break
        pick = int(candidates[torch.randint(candidates.numel(), (1,), generator=generator)])
        bits[pick] += 1
        average += float(weights[pick]) / total
    log = SearchLog(evaluator, "random", progress, total=1)
    accuracy, _, _ = log.try_bits(bits, "final", f"seed {seed}")
    return log.result("random", bits, target, accuracy, {"seed": seed, "spread": spread, "min_bits": min_bits})


def sensitivity(evaluator: SearchEvaluator, target: Target, *, start_bits: int | None = None, reference_bits: int = 8,
                min_bits: int = 1, progress: bool = True, **_) -> AllocationResult:
    """Per-layer bits by measured validation-loss rise per bit saved (see module docstring)."""
    space = evaluator.space
    start = start_bits or target.start_bits()
    if not min_bits <= start <= 16:
        raise AllocationError(f"start_bits {start} must lie in {min_bits}..16")
    candidates = list(range(min_bits, start + 1))
    log = SearchLog(evaluator, "sensitivity", progress, total=1 + len(space.names) * len(candidates) + 1)
    reference = space.uniform(reference_bits)
    _, base_loss, _ = log.try_bits(reference, "measure", f"all layers at {reference_bits} bits")
    rise: dict[tuple[int, int], float] = {}
    for index, name in enumerate(space.names):
        for b in candidates:
            trial = reference.clone()
            trial[space.offsets[index]:space.offsets[index + 1]] = b
            _, loss, _ = log.try_bits(trial, "measure", f"{name} at {b} bits")
            rise[index, b] = loss - base_loss
    params = [space.channels[i] * space.params_per_channel[i] for i in range(len(space.names))]
    budget = target.max_bits * sum(params)
    extra = extra_budgets(evaluator, target)
    if extra:  # several budgets: the same exact choice as an integer program
        layer_bits = _layer_choice_under(space, rise, candidates, budget, extra, target)
    else:
        options = [[(b * params[i], rise[i, b], b) for b in candidates] for i in range(len(space.names))]
        layer_bits = pareto_knapsack(options, budget)
    if layer_bits is None:
        raise AllocationError(f"sensitivity allocation cannot reach {target.max_bits:.2f} bits with {min_bits} bits per layer")

    bits = torch.cat([torch.full((space.channels[i],), layer_bits[i], dtype=torch.long) for i in range(len(space.names))])
    bits = spend_by_sensitivity(space, bits, layer_bits, rise, target.max_bits, start, extra)
    accuracy, _, _ = log.try_bits(bits, "final", "chosen plan")
    table = {f"{space.names[i]}@{b}": round(v, 6) for (i, b), v in rise.items()}
    return log.result("sensitivity", bits, target, accuracy,
                      {"start_bits": start, "reference_bits": reference_bits, "min_bits": min_bits},
                      {"loss_rise": table, "layer_bits": dict(zip(space.names, layer_bits))})


def _layer_choice_under(space, rise: dict[tuple[int, int], float], widths: list[int], bits_budget: float,
                        extra: list[ChannelBudget], target: Target) -> list[int] | None:
    """One width per layer minimising the summed loss rise under the average-bits and ``extra`` budgets
    (the integer program of :mod:`cpq_lib.allocation.solver`; None when nothing fits)."""
    groups = len(space.names)
    omega = np.array([[rise[i, b] for b in widths] for i in range(groups)])
    costs = [Budget("average weight bits", np.array([[space.channels[i] * space.params_per_channel[i] * b for b in widths]
                                                      for i in range(groups)], dtype=np.float64), bits_budget)]
    for budget in extra:
        per_layer = [float(budget.per_bit[space.offsets[i]:space.offsets[i + 1]].sum()) for i in range(groups)]
        costs.append(Budget(budget.name, np.array([[p * b for b in widths] for p in per_layer]), budget.limit))
    try:
        choice = solve_assignment(omega, costs).choice
    except AllocationError:
        return None
    return [widths[k] for k in choice]


def spend_by_sensitivity(space, bits: torch.Tensor, layer_bits: list[int], rise: dict[tuple[int, int], float],
                         limit: float, top: int, extra: list[ChannelBudget] = ()) -> torch.Tensor:
    """Spend what the per-layer choice leaves of the budget (with few, unequal layers it can be a lot):
    raise channels of the layer whose next width saves the most measured loss per added bit, first
    channels first, one layer after another, while the average stays at most ``limit`` (and every
    ``extra`` budget holds). A part of a layer raised counts as that part of the layer's loss saving
    (the additive model, interpolated)."""
    bits = bits.clone()
    weights = space.weights()
    total = float(weights.sum())
    spent = float((bits.double() * weights).sum())
    gains = []
    for i, b in enumerate(layer_bits):
        if b < top:
            gains.append(((rise[i, b] - rise[i, b + 1]) / (space.channels[i] * space.params_per_channel[i]), -i, i))
    for _, _, i in sorted(gains, reverse=True):  # a saving measured as <= 0 is noise: spend there last, still spend
        for channel in range(space.offsets[i], space.offsets[i + 1]):
            if spent + float(weights[channel]) > limit * total + 1e-9:
                break
            bits[channel] += 1
            if not within(extra, bits):
                bits[channel] -= 1
                break
            spent += float(weights[channel])
    return bits


def pareto_knapsack(options: list[list[tuple[float, float, int]]], budget: float) -> list[int] | None:
    """Pick one (cost, loss, bits) option per layer: least summed loss with summed cost <= ``budget``.

    Exact for additive losses: layers are merged one at a time, keeping only the Pareto front of
    (cost, loss) pairs (a cheaper or equal state with a higher loss is never needed). Fronts stay small
    (hundreds to a few thousand states for ResNet-20's 18 layers and 6 widths), unlike a table over
    every possible bit count.
    """
    front: list[tuple[float, float, tuple[int, ...]]] = [(0.0, 0.0, ())]
    for layer in options:
        merged = sorted(((cost + c, loss + l, chosen + (b,)) for cost, loss, chosen in front for c, l, b in layer
                         if cost + c <= budget + 1e-9), key=lambda state: (state[0], state[1]))
        front, best = [], float("inf")
        for state in merged:
            if state[1] < best - 1e-15:
                front.append(state)
                best = state[1]
        if not front:
            return None
    return list(min(front, key=lambda state: (state[1], -state[0]))[2])
