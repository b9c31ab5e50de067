"""Class-based quantization (Sun et al., DATE 2023): a channel's bits follow how many classes it matters for.

A channel's class count (in [0, C]; by default in the reference's order, ``max_p sum_c``, see
:meth:`ClassScores.class_count`; ``count="sum_of_maxima"`` sums the class scores) is mapped to bits by N ascending
borders: bits = the number of borders the count exceeds, so a count at or below the lowest border
means 0 bits (pruned) and one above every border N bits. All borders start at 0 (every channel that
matters to some class gets N bits). The search then moves one border at a time up a grid of
``C / grid`` steps to the next position that changes some channel's bits, trying every border that can
move and keeping the move with the best validation accuracy (ties: the one saving more bits), until
the average meets the budget. The floor ``T1 * (acc0 - chance) + chance`` is recorded per step; the
search does not stop at it (every allocator must reach the same budget), but the result says whether
the final plan kept it.
"""

from __future__ import annotations

import torch

from ..classpath import ClassScores
from .budgets import extra_budgets, within
from .evaluator import SearchEvaluator
from .search import AllocationResult, SearchLog
from .space import AllocationError, Target


COUNT_ORDERS = ("reference", "sum_of_maxima")


def class_counts(scores: ClassScores, names: list[str], order: str = "reference") -> torch.Tensor:
    """Class counts of the quantized channels, flattened in layer order."""
    missing = [n for n in names if n not in scores.scores]
    if missing:
        raise AllocationError(f"the class scores have no entry for quantized layer(s) {missing[:5]}; score the same model")
    if order not in COUNT_ORDERS:
        raise AllocationError(f"unknown class-count order {order!r}; allowed: {', '.join(COUNT_ORDERS)}")
    counts = scores.class_count(order)
    return torch.cat([counts[n].double() for n in names])


def bits_from_borders(counts: torch.Tensor, borders: list[float]) -> torch.Tensor:
    """bits = number of borders strictly below the count."""
    return (counts[:, None] > torch.tensor(borders, dtype=torch.float64)[None, :]).sum(1).long()


def class_count(evaluator: SearchEvaluator, target: Target, *, scores: ClassScores | None = None,
                start_bits: int | None = None, grid: int = 40, t1: float | None = None, count: str = "reference",
                progress: bool = True, **_) -> AllocationResult:
    """Borders moved until the budget is met (see module docstring)."""
    if scores is None:
        raise AllocationError("the class_count allocator needs class scores (cpq_lib.pipeline.class_scores)")
    if grid < 1:
        raise AllocationError(f"grid must be a positive number of steps, got {grid}")
    space = evaluator.space
    t1 = 0.9 if t1 is None else t1
    levels = start_bits or target.start_bits()
    counts = class_counts(scores, space.names, count)
    num_classes = scores.num_classes
    step = num_classes / grid
    borders = [0.0] * levels
    bits = bits_from_borders(counts, borders)
    log = SearchLog(evaluator, "class count", progress)
    accuracy, _, _ = log.try_bits(bits, "start", f"borders {borders}")
    chance = 1.0 / num_classes
    floor = t1 * (accuracy - chance) + chance

    def next_position(k: int) -> float | None:
        """Border k's next grid position that changes some channel's bits, within the borders above it."""
        ceiling = borders[k + 1] if k + 1 < levels else float(num_classes)
        position = borders[k]
        while position + step <= ceiling + 1e-9:
            position = round(position + step, 9)
            if bool(((counts > borders[k]) & (counts <= position)).any()):
                return position
        return None

    extra = extra_budgets(evaluator, target)
    while space.average(bits) > target.max_bits or not within(extra, bits):
        options = []
        for k in range(levels):
            position = next_position(k)
            if position is None:
                continue
            trial_borders = borders[:k] + [position] + borders[k + 1:]
            trial = bits_from_borders(counts, trial_borders)
            saved = space.average(bits) - space.average(trial)
            trial_accuracy, _, _ = log.try_bits(trial, "search", f"border {k}: {borders[k]:.2f} -> {position:.2f}")
            log.rows[-1]["accepted"] = False
            options.append((trial_accuracy, saved, -k, trial_borders, trial, len(log.rows) - 1))
        if not options:
            raise AllocationError(f"class-count borders cannot move further; {space.average(bits):.3f} bits remain "
                                  f"above {target.max_bits:.2f}")
        accuracy, _, _, borders, bits, row = max(options, key=lambda o: (o[0], o[1], o[2]))
        log.rows[row]["accepted"] = True
        log.rows[row]["above_floor"] = accuracy >= floor
    knobs = {"start_bits": levels, "grid": grid, "t1": t1, "count": count}
    return log.result("class_count", bits, target, accuracy, knobs,
                      {"borders": [round(b, 4) for b in borders], "floor": floor, "kept_floor": accuracy >= floor})
