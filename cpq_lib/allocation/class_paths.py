"""ClassPathQ's bit search (thesis stage 4): bits per class critical path, searched class by class.

Each class has a critical path (``cpq_lib.classpath.critical_paths`` over the quantized layers);
channels on no path form the unimportant pseudo-class. Each (pseudo-)class holds a bit-width, all
starting at N (4, or 6 for targets of 3 bits and more); a channel gets the largest bit-width among the
classes whose path contains it. Classes are searched in similarity order (``class_order``).

Phase 1 (the reference's ``bit_search``): class by class in search order, lower the class one bit at a
time down to its floor; after each step, if the average weight bit-width is below the budget the search
ends; if the validation accuracy fell below ``T1 * (acc0 - chance) + chance`` the step is undone, the
threshold relaxed to ``(threshold - chance) * R + chance`` and the next class taken. Phase 2 (only if
the budget is still not met) repeatedly lowers by one bit the first class in search order among those
holding the fewest bits >= 2 (``phase2="lowest_first"``, the CIFAR-10 configs) or the most bits
(``"highest_first"``) until the average is at most the budget. The search runs for every path sparsity
and keeps one plan (``select``).

Two presets, every difference a named knob of :class:`ClassPathSettings`:

- ``preset="reference"`` reproduces the reference code (GUIDE 1.1 steps 2-4): one model-wide threshold
  per class with ties included, the CIFAR-10 configs' T1 / R / threshold / similarity per target
  (:func:`reference_settings`), unnormalised interference with the row sum (diagonal included) as the
  total, ascending order, the unimportant set swapped into position ``loc`` (C // 2 for sparsities
  below 0.9, C at 0.9), floors at 1 bit, no fill, and the plan with the highest average bits.
- ``preset="cpq"``: this package's earlier variant: per-layer top-k paths (ties by channel index),
  Jaccard similarity, descending order, the unimportant set first and allowed down to 0 bits (pruned),
  phase 2 highest-first, a fill phase, and the plan with the best validation accuracy. The fill phase
  raises classes back one bit at a time, best validation accuracy first, while the budget holds (a
  class-level step can land far below the budget).

Ablations that isolate the class ingredient: ``paths="random"`` replaces each class's path, layer by
layer, by as many random channels (seeded); ``order="descending"`` on the reference reverses its order.
Evaluations that would not change the plan (the reference's first step of each class, to N bits) are
not made; they cannot change the outcome.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Sequence

import torch

from ..classpath import (
    UNIMPORTANT, ClassScores, CriticalPaths, class_order, critical_paths, interference_matrix, jaccard_matrix, random_paths,
)
from .budgets import ChannelBudget, extra_budgets, within
from .evaluator import SearchEvaluator
from .search import AllocationResult, SearchLog
from .space import AllocationError, Target

SIMILARITIES = ("jaccard", "interference")
REFERENCE_SPARSITIES = (0.3, 0.5, 0.6, 0.9)
PRESETS = ("reference", "cpq")
CHOICES = {"similarity": SIMILARITIES, "threshold": ("per_class", "shared"), "ties": ("include", "index"),
           "scope": ("model", "layer"), "order": ("ascending", "descending"), "placement": ("swap", "first", "last"),
           "phase2": ("lowest_first", "highest_first"), "select": ("highest_bits", "best_accuracy"),
           "paths": ("class", "random")}


@dataclass(frozen=True)
class ClassPathSettings:
    """Every knob of the class-path search (see the module docstring for the two presets)."""

    sparsities: tuple[float, ...] = REFERENCE_SPARSITIES
    t1: float = 0.9
    r: float = 0.8
    similarity: str = "interference"
    threshold: str = "shared"            # per_class | shared (one cut-off for all classes)
    ties: str = "include"                # include (reference) | index (exact top-k, ties by channel order)
    scope: str = "model"                 # model (one pool over all quantized layers) | layer
    order: str = "ascending"             # by total similarity
    placement: str = "swap"              # where the unimportant set goes: swap (into position loc) | first | last
    loc: int | None = None               # swap position; None: C // 2 below sparsity 0.9, C at 0.9 (the reference sweep)
    include_self: bool = True            # the total similarity includes the diagonal (the reference's row sum)
    normalize_interference: bool = False  # divide interference by the path size
    phase2: str = "lowest_first"
    min_bits: int = 1                    # floor of a class
    unimportant_min_bits: int = 1        # floor of the unimportant set (0: may be pruned)
    fill: bool = False
    select: str = "highest_bits"
    paths: str = "class"                 # class | random (ablation: random paths of the same per-layer sizes)
    start_bits: int | None = None        # None: 4 below 3 target bits, else 6

    def __post_init__(self) -> None:
        for name, allowed in CHOICES.items():
            if getattr(self, name) not in allowed:
                raise AllocationError(f"classpath {name}: {getattr(self, name)!r} is not allowed; choose one of {list(allowed)}")
        if not self.sparsities:
            raise AllocationError("give at least one path sparsity")
        bad = [s for s in self.sparsities if not 0 <= float(s) < 1]
        if bad:
            raise AllocationError(f"path sparsities must lie in [0, 1), got {bad}")
        if not (0 < self.t1 <= 1 and 0 < self.r <= 1):
            raise AllocationError(f"T1 and R must lie in (0, 1], got T1={self.t1}, R={self.r}")
        if not 0 <= self.unimportant_min_bits <= 16 or not 1 <= self.min_bits <= 16:
            raise AllocationError(f"floors: min_bits {self.min_bits} must lie in 1..16, unimportant_min_bits "
                                  f"{self.unimportant_min_bits} in 0..16")

    def knobs(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self).items()}


def reference_settings(target: Target) -> dict[str, Any]:
    """The reference CIFAR-10 configs' search settings for a target (``resnet20_c10_a{2,3,4}w{2,3,4}.json``):
    below 3 bits a2w2's, below 4 bits a3w3's, else a4w4's. Phase 2 is lowest-first in all three."""
    if target.weight_bits < 3:
        return {"t1": 0.9, "r": 0.8, "threshold": "shared", "similarity": "interference"}
    if target.weight_bits < 4:
        return {"t1": 0.9, "r": 0.7, "threshold": "per_class", "similarity": "interference"}
    return {"t1": 0.95, "r": 0.9, "threshold": "per_class", "similarity": "interference"}


def preset_settings(preset: str, target: Target, **overrides: Any) -> ClassPathSettings:
    """A preset's settings for ``target``, with named knobs overridden (None values are ignored)."""
    if preset == "reference":
        base: dict[str, Any] = reference_settings(target)
    elif preset == "cpq":
        base = {"t1": 0.9, "r": 0.9, "similarity": "jaccard", "threshold": "per_class", "ties": "index", "scope": "layer",
                "order": "descending", "placement": "first", "include_self": False, "normalize_interference": True,
                "phase2": "highest_first", "unimportant_min_bits": 0, "fill": True, "select": "best_accuracy"}
    else:
        raise AllocationError(f"unknown classpath preset {preset!r}; allowed: {', '.join(PRESETS)}")
    fields = {f.name for f in dataclasses.fields(ClassPathSettings)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise AllocationError(f"unknown classpath knob(s) {unknown}; allowed: {sorted(fields)}")
    values = {**base, **{k: v for k, v in overrides.items() if v is not None}}
    if "sparsities" in values:
        values["sparsities"] = tuple(float(s) for s in values["sparsities"])
    return ClassPathSettings(**values)


def channel_bits(masks: torch.Tensor, class_bits: torch.Tensor, unimportant_bits: int) -> torch.Tensor:
    """Per channel: the largest bit-width of the classes whose path holds it; unimportant channels: their own."""
    on_path = masks.any(0)
    best = torch.where(masks, class_bits[:, None], torch.full_like(masks, -1, dtype=torch.long)).amax(0)
    return torch.where(on_path, best, torch.full_like(best, unimportant_bits))


def search_paths(scores: ClassScores, names: list[str], sparsity: float, settings: ClassPathSettings,
                 seed: int) -> CriticalPaths:
    """The paths a search uses: over the quantized layers only; random ones for the ablation."""
    paths = critical_paths(scores, sparsity, threshold=settings.threshold, scope=settings.scope, layers=names,
                           ties=settings.ties)
    return random_paths(paths, seed) if settings.paths == "random" else paths


def search_order(paths: CriticalPaths, scores: ClassScores, sparsity: float, settings: ClassPathSettings) -> list[str]:
    """Classes (and the unimportant set) in the order the search lowers them."""
    if settings.similarity == "jaccard":
        matrix = jaccard_matrix(paths)
    else:
        matrix = interference_matrix(paths, scores, normalize=settings.normalize_interference)
    n = paths.num_classes
    loc = settings.loc if settings.loc is not None else (n if sparsity >= 0.9 else n // 2)
    return class_order(matrix, paths.class_names, descending=settings.order == "descending",
                       placement=settings.placement, loc=loc, include_self=settings.include_self)


def _search_one(evaluator: SearchEvaluator, target: Target, scores: ClassScores, sparsity: float,
                settings: ClassPathSettings, start: int, seed: int, log: SearchLog,
                extra: list[ChannelBudget] = ()) -> tuple[torch.Tensor, float, dict]:
    space = evaluator.space
    paths = search_paths(scores, space.names, sparsity, settings, seed)
    masks = torch.cat([paths.masks[name] for name in space.names], dim=1)  # (classes, quantized channels)
    order = search_order(paths, scores, sparsity, settings)
    index = {name: i for i, name in enumerate(paths.class_names)}
    class_bits = torch.full((paths.num_classes,), start, dtype=torch.long)
    unimportant = start

    def current() -> torch.Tensor:
        return channel_bits(masks, class_bits, unimportant)

    def shift(name: str, step: int) -> None:
        nonlocal unimportant
        if name == UNIMPORTANT:
            unimportant += step
        else:
            class_bits[index[name]] += step

    def bits_of(name: str) -> int:
        return unimportant if name == UNIMPORTANT else int(class_bits[index[name]])

    def floor_of(name: str) -> int:
        return settings.unimportant_min_bits if name == UNIMPORTANT else settings.min_bits

    def average() -> float:
        return space.average(current())

    def under() -> bool:  # the reference's test, "average below the target", and every other budget of the target
        return average() < target.max_bits and within(extra, current())

    def over() -> bool:
        return average() > target.max_bits or not within(extra, current())

    tag = f"s={sparsity:g}"
    accuracy, _, _ = log.try_bits(current(), f"{tag} start", f"every class at {start} bits")
    chance = 1.0 / scores.num_classes
    acc0 = accuracy
    required = t1_threshold = settings.t1 * (acc0 - chance) + chance
    done = under()
    # phase 1: class by class in search order; ends as soon as the average is below the budget
    for name in order:
        if done:
            break
        while bits_of(name) > floor_of(name):
            shift(name, -1)
            trial, _, _ = log.try_bits(current(), f"{tag} phase 1", f"{name} -> {bits_of(name)} bits")
            log.rows[-1]["threshold"] = required
            if under():
                accuracy, done = trial, True
                break
            if trial < required:  # undo, relax the threshold, next class
                log.rows[-1]["accepted"] = False
                shift(name, +1)
                required = (required - chance) * settings.r + chance
                break
            accuracy = trial
    # phase 2: one bit at a time from the lowest (or highest) class, in search order, until the budget holds
    while over():
        movable = [name for name in order if bits_of(name) > max(floor_of(name), 1 if settings.phase2 == "lowest_first" else 0)]
        if not movable:
            raise AllocationError(f"sparsity {sparsity}: every class is at its minimum and {average():.3f} "
                                  f"bits remain above {target.max_bits:.2f}; lower min_bits")
        pick = min if settings.phase2 == "lowest_first" else max
        chosen = pick(bits_of(name) for name in movable)
        name = next(name for name in movable if bits_of(name) == chosen)
        shift(name, -1)
        accuracy, _, _ = log.try_bits(current(), f"{tag} phase 2", f"{name} -> {bits_of(name)} bits")
    # fill (the cpq preset): raise back, one bit at a time, the class whose raise gives the best accuracy
    while settings.fill:
        options = []
        for name in order:
            if bits_of(name) >= start:
                continue
            shift(name, +1)
            if average() <= target.max_bits and within(extra, current()):
                trial, _, _ = log.try_bits(current(), f"{tag} fill", f"{name} -> {bits_of(name)} bits")
                log.rows[-1]["accepted"] = False
                options.append((trial, -order.index(name), name, len(log.rows) - 1))
            shift(name, -1)
        if not options:
            break
        accuracy, _, name, row = max(options)
        shift(name, +1)
        log.rows[row]["accepted"] = True
    details = {"order": order, "class_bits": {n: bits_of(n) for n in order}, "acc0": acc0, "first_threshold": t1_threshold,
               "final_threshold": required, "path_channels": int(masks.any(0).sum()), "channels": space.size,
               "path_sizes": {n: int(masks[index[n]].sum()) for n in paths.class_names}}
    return current(), accuracy, details


def classpath(evaluator: SearchEvaluator, target: Target, *, scores: ClassScores | None = None, preset: str = "reference",
              seed: int = 0, progress: bool = True, sparsities: Sequence[float] | None = None, **knobs: Any) -> AllocationResult:
    """ClassPathQ's search over a sparsity sweep (see the module docstring); ``preset`` and named knobs."""
    if scores is None:
        raise AllocationError("the classpath allocator needs class scores (cpq_lib.pipeline.class_scores)")
    settings = preset_settings(preset, target, sparsities=sparsities, **knobs)
    start = settings.start_bits or target.start_bits()
    if not settings.unimportant_min_bits <= start or not settings.min_bits <= start:
        raise AllocationError(f"floors (min_bits {settings.min_bits}, unimportant_min_bits {settings.unimportant_min_bits}) "
                              f"must not exceed the start bits {start}")
    log = SearchLog(evaluator, "class paths", progress)
    extra = extra_budgets(evaluator, target)
    candidates = []
    for sparsity in settings.sparsities:
        bits, accuracy, details = _search_one(evaluator, target, scores, float(sparsity), settings, start, seed, log, extra)
        candidates.append((accuracy, evaluator.space.average(bits), -len(candidates), float(sparsity), bits, details))
    if settings.select == "highest_bits":  # the reference: strictly greater wins, so the first of equals stays
        best = max(candidates, key=lambda c: (c[1], c[2]))
    else:
        best = max(candidates, key=lambda c: (c[0], c[2]))
    accuracy, _, _, sparsity, bits, details = best
    per_sparsity = {f"{c[3]:g}": {"accuracy": c[0], "average_bits": c[1]} for c in candidates}
    return log.result("classpath", bits, target, accuracy, {"preset": preset, **settings.knobs(), "start_bits": start},
                      {"sparsity": sparsity, **details, "per_sparsity": per_sparsity})
