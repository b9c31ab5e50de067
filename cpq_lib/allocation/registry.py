"""Allocators by name: each is ``fn(evaluator, target, **knobs) -> AllocationResult``.

Every allocator honours every budget of the target: average weight bits, and where given BitOPs
(``max_gbitops``) and stored bytes (``max_bytes``), so a comparison can be run at equal BitOPs.

Every allocator sees the model only through a :class:`SearchEvaluator` (validation subset, counted
evaluations) and class scores computed from training images, so none can read the test split.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Callable

from ..classpath import ClassScores
from .aimet_amp import aimet, aimet_available
from .baselines import random_bits, sensitivity, uniform
from .budgets import check_spent
from .class_count import class_count
from .class_paths import classpath
from .evaluator import SearchEvaluator
from .hawq import hawq
from .search import AllocationResult
from .space import AllocationError, Target

ALLOCATORS: dict[str, Callable[..., AllocationResult]] = {
    "uniform": uniform,
    "random": random_bits,
    "class_count": class_count,                                     # the reference's class count, max_p sum_c
    "class_count_sum": partial(class_count, count="sum_of_maxima"),  # the sum of the per-class maxima
    "sensitivity": sensitivity,
    "hawq": hawq,                                                   # HAWQ-V3: Hessian trace x perturbation, per layer, exact
    "hawq_channel": partial(hawq, granularity="channel"),           # the same per output channel
    "hawq_class": partial(hawq, granularity="channel", class_weights="loss"),  # per-class traces, hard classes weigh more
    "aimet": aimet,                                                 # AIMET's automatic mixed precision, run (optional dependency)
    "classpath": classpath,                                         # preset "reference" (GUIDE 1.1)
    "classpath_cpq": partial(classpath, preset="cpq"),              # this package's variant
    "classpath_random_paths": partial(classpath, paths="random"),   # ablation: random paths, same per-layer sizes
    "classpath_reversed": partial(classpath, order="descending"),   # ablation: the reference's order reversed
}
OPTIONAL = {"aimet": aimet_available}  # allocators whose peer package is an optional dependency: name -> is it installed
NEEDS_SCORES = ("class_count", "class_count_sum", "classpath", "classpath_cpq", "classpath_random_paths",
                "classpath_reversed")


def allocate(method: str, evaluator: SearchEvaluator, target: Target, *, scores: ClassScores | None = None,
             seed: int = 0, progress: bool = True, **knobs: Any) -> AllocationResult:
    """Run allocator ``method`` for ``target``; the plan's average never exceeds ``target.max_bits``."""
    if method not in ALLOCATORS:
        raise AllocationError(f"unknown allocator {method!r}; allowed: {', '.join(ALLOCATORS)}")
    if method in NEEDS_SCORES and scores is None:
        raise AllocationError(f"allocator {method!r} needs class scores")
    result = ALLOCATORS[method](evaluator, target, scores=scores, seed=seed, progress=progress, **knobs)
    average = result.plan.meta["average_bits"]
    if average > target.max_bits + 1e-9:  # every allocator promises this; a violation is a bug, not bad input
        raise AssertionError(f"{method} returned {average:.4f} bits, above the budget {target.max_bits:.4f}")
    result.plan.meta.update(check_spent(method, evaluator, target, evaluator.space.from_plan(result.plan)))
    result.plan.meta["seed"] = seed
    result.plan.meta["allocator"] = method  # the arm's name (classpath_cpq, not classpath)
    return result
