"""ClassPathQ's bit search (thesis stage 4): bits per class critical path, searched class by class.

For one path sparsity: each class keeps its top ``1 - sparsity`` channels per layer (its critical
path); channels on no path form the unimportant pseudo-class. Each (pseudo-)class holds a bit-width,
starting at N (4, or 6 for targets of 3 bits and more); a channel gets the largest bit-width among the
classes whose path contains it, and the unimportant channels get the pseudo-class's bit-width.

Phase 1 goes through the classes in the similarity order (``cpq_lib.classpath.class_order``: the
unimportant pseudo-class first, then by total similarity) and lowers each class one bit at a time while
the validation accuracy stays at or above ``T1 * (acc0 - chance) + chance`` (acc0: all classes at N
bits); a step that falls below is undone, the threshold relaxed to ``(threshold - chance) * R + chance``,
and the search moves to the next class. Phase 2 lowers the classes holding the most bits, in search
order, one bit at a time until the average meets the budget. Both phases stop as soon as the budget is
met. A third phase is ours (``fill=False`` leaves it out): a class-level step can land far below the
budget, so classes are raised back one bit at a time, best validation accuracy first, while the budget
holds. The search runs for every sparsity of a sweep and keeps the plan with the best validation accuracy.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..classpath import UNIMPORTANT, ClassScores, class_order, critical_paths, interference_matrix, jaccard_matrix
from .evaluator import SearchEvaluator
from .search import AllocationResult, SearchLog
from .space import AllocationError, Target

SIMILARITIES = ("jaccard", "interference")
REFERENCE_SPARSITIES = (0.3, 0.5, 0.6, 0.9)


def channel_bits(masks: torch.Tensor, class_bits: torch.Tensor, unimportant_bits: int) -> torch.Tensor:
    """Per channel: the largest bit-width of the classes whose path holds it; unimportant channels: their own."""
    on_path = masks.any(0)
    best = torch.where(masks, class_bits[:, None], torch.full_like(masks, -1, dtype=torch.long)).amax(0)
    return torch.where(on_path, best, torch.full_like(best, unimportant_bits))


def _search_one(evaluator: SearchEvaluator, target: Target, scores: ClassScores, sparsity: float, *, start: int,
                t1: float, r: float, similarity: str, threshold: str, min_bits: int, unimportant_min_bits: int,
                fill: bool, log: SearchLog) -> tuple[torch.Tensor, float, dict]:
    space = evaluator.space
    paths = critical_paths(scores, sparsity, threshold=threshold)
    masks = torch.cat([paths.masks[name] for name in space.names], dim=1)  # (classes, quantized channels)
    matrix = jaccard_matrix(paths) if similarity == "jaccard" else interference_matrix(paths, scores, normalize=True)
    order = class_order(matrix, paths.class_names)
    index = {name: i for i, name in enumerate(paths.class_names)}
    class_bits = torch.full((paths.num_classes,), start, dtype=torch.long)
    unimportant = start

    def current() -> torch.Tensor:
        return channel_bits(masks, class_bits, unimportant)

    def lower(name: str) -> None:
        nonlocal unimportant
        if name == UNIMPORTANT:
            unimportant -= 1
        else:
            class_bits[index[name]] -= 1

    def raise_one(name: str) -> None:
        nonlocal unimportant
        if name == UNIMPORTANT:
            unimportant += 1
        else:
            class_bits[index[name]] += 1

    def bits_of(name: str) -> int:
        return unimportant if name == UNIMPORTANT else int(class_bits[index[name]])

    def floor_of(name: str) -> int:
        return unimportant_min_bits if name == UNIMPORTANT else min_bits

    tag = f"s={sparsity:g}"
    accuracy, _, _ = log.try_bits(current(), f"{tag} start", f"every class at {start} bits")
    chance = 1.0 / scores.num_classes
    acc0 = accuracy
    required = t1 * (acc0 - chance) + chance
    # phase 1: class by class in search order, while accuracy stays above the (relaxing) threshold
    for name in order:
        if space.average(current()) <= target.max_bits:
            break
        while bits_of(name) > floor_of(name) and space.average(current()) > target.max_bits:
            lower(name)
            trial_accuracy, _, ok = log.try_bits(current(), f"{tag} phase 1", f"{name} -> {bits_of(name)} bits",
                                                 accept_if=lambda result: result.accuracy >= required)
            log.rows[-1]["threshold"] = required
            if not ok:  # undo, relax the threshold, next class
                raise_one(name)
                required = (required - chance) * r + chance
                break
            accuracy = trial_accuracy
    # phase 2: lower the classes holding the most bits, in search order, until the budget is met
    while space.average(current()) > target.max_bits:
        movable = [name for name in order if bits_of(name) > floor_of(name)]
        if not movable:
            raise AllocationError(f"sparsity {sparsity}: every class is at its minimum and {space.average(current()):.3f} "
                                  f"bits remain above {target.max_bits:.2f}; lower min_bits")
        highest = max(bits_of(name) for name in movable)
        name = next(name for name in movable if bits_of(name) == highest)
        lower(name)
        accuracy, _, _ = log.try_bits(current(), f"{tag} phase 2", f"{name} -> {bits_of(name)} bits")
    # fill (ours, not the thesis's; fill=False switches it off): a class-level step can drop far below
    # the budget (lowering the last class at a width lowers every channel its path shares); raise back,
    # one bit at a time, the class whose raise gives the best accuracy while the budget holds
    while fill:
        options = []
        for name in order:
            if bits_of(name) >= start:
                continue
            raise_one(name)
            if space.average(current()) <= target.max_bits:
                trial_accuracy, _, _ = log.try_bits(current(), f"{tag} fill", f"{name} -> {bits_of(name)} bits")
                log.rows[-1]["accepted"] = False
                options.append((trial_accuracy, -order.index(name), name, len(log.rows) - 1))
            lower(name)
        if not options:
            break
        accuracy, _, name, row = max(options)
        raise_one(name)
        log.rows[row]["accepted"] = True
    details = {"order": order, "class_bits": {n: bits_of(n) for n in order}, "acc0": acc0,
               "final_threshold": required, "path_channels": int(masks.any(0).sum()), "channels": space.size}
    return current(), accuracy, details


def classpath(evaluator: SearchEvaluator, target: Target, *, scores: ClassScores | None = None,
              sparsities: Sequence[float] = REFERENCE_SPARSITIES, t1: float = 0.9, r: float = 0.9,
              similarity: str = "jaccard", threshold: str = "per_class", start_bits: int | None = None,
              min_bits: int = 1, unimportant_min_bits: int = 0, fill: bool = True, progress: bool = True,
              **_) -> AllocationResult:
    """The thesis's search over a sparsity sweep; keeps the best plan by validation accuracy."""
    if scores is None:
        raise AllocationError("the classpath allocator needs class scores (cpq_lib.pipeline.class_scores)")
    if similarity not in SIMILARITIES:
        raise AllocationError(f"unknown similarity {similarity!r}; allowed: {', '.join(SIMILARITIES)}")
    if not sparsities:
        raise AllocationError("give at least one path sparsity")
    if not (0 < t1 <= 1 and 0 < r <= 1):
        raise AllocationError(f"T1 and R must lie in (0, 1], got T1={t1}, R={r}")
    start = start_bits or target.start_bits()
    if not 0 <= unimportant_min_bits <= min_bits <= start:
        raise AllocationError(f"need 0 <= unimportant_min_bits ({unimportant_min_bits}) <= min_bits ({min_bits}) "
                              f"<= start bits ({start})")
    log = SearchLog(evaluator, "class paths", progress)
    candidates = []
    for sparsity in sparsities:
        bits, accuracy, details = _search_one(evaluator, target, scores, float(sparsity), start=start, t1=t1, r=r,
                                              similarity=similarity, threshold=threshold, min_bits=min_bits,
                                              unimportant_min_bits=unimportant_min_bits, fill=fill, log=log)
        candidates.append((accuracy, -len(candidates), float(sparsity), bits, details))
    accuracy, _, sparsity, bits, details = max(candidates, key=lambda c: (c[0], c[1]))
    knobs = {"sparsities": [float(s) for s in sparsities], "t1": t1, "r": r, "similarity": similarity,
             "threshold": threshold, "start_bits": start, "min_bits": min_bits, "unimportant_min_bits": unimportant_min_bits,
             "fill": fill}
    per_sparsity = {f"{c[2]:g}": {"accuracy": c[0], "average_bits": evaluator.space.average(c[3])} for c in candidates}
    return log.result("classpath", bits, target, accuracy, knobs,
                      {"sparsity": sparsity, **details, "per_sparsity": per_sparsity})
