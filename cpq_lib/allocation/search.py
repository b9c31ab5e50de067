"""What every allocator returns (plan, trajectory, cost) and the bookkeeping they share."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import pandas as pd
import torch

from ..progress import progress as progress_bar
from ..quant import BitPlan
from .evaluator import SearchEvaluator
from .space import Target


@dataclass
class AllocationResult:
    """A plan meeting the target, how the search got there, and what it cost."""

    plan: BitPlan
    trajectory: pd.DataFrame
    cost: dict[str, float]
    accuracy: float | None  # on the search's validation subset, for the final plan (None: not evaluated)
    details: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"allocator": self.plan.meta.get("allocator"), "average_bits": self.plan.meta.get("average_bits"),
                "search_accuracy": self.accuracy, **self.cost}


class SearchLog:
    """Trajectory rows (one per tried step) with evaluation counts, and a progress bar."""

    def __init__(self, evaluator: SearchEvaluator, name: str, progress: bool = True, total: int | None = None) -> None:
        self.evaluator = evaluator
        self.rows: list[dict[str, Any]] = []
        self.started = time.perf_counter()
        self.evaluations_at_start = evaluator.evaluations
        self.seconds_at_start = evaluator.seconds
        self.bar = progress_bar(range(total) if total else iter(int, 1), progress, desc=name, leave=False, total=total)
        self._bar_iter = iter(self.bar)

    def try_bits(self, bits: torch.Tensor, phase: str, action: str, accept_if=None) -> tuple[float, float, bool]:
        """Evaluate ``bits``; returns (accuracy, loss, accepted) and records a row."""
        result = self.evaluator.evaluate(bits)
        accepted = True if accept_if is None else bool(accept_if(result))
        self.record(bits, phase, action, result.accuracy, result.loss, accepted)
        return result.accuracy, result.loss, accepted

    def record(self, bits: torch.Tensor, phase: str, action: str, accuracy: float | None, loss: float | None,
               accepted: bool = True, **extra: Any) -> None:
        self.rows.append({"step": len(self.rows), "phase": phase, "action": action,
                          "average_bits": self.evaluator.space.average(bits), "accuracy": accuracy, "loss": loss,
                          "accepted": accepted, "evaluations": self.evaluator.evaluations - self.evaluations_at_start,
                          **extra})
        next(self._bar_iter, None)
        if hasattr(self.bar, "set_postfix") and accuracy is not None:
            self.bar.set_postfix(bits=f"{self.rows[-1]['average_bits']:.2f}", acc=f"{accuracy:.3f}")

    def result(self, allocator: str, bits: torch.Tensor, target: Target, accuracy: float | None,
               knobs: dict[str, Any], details: dict[str, Any] | None = None) -> AllocationResult:
        if hasattr(self.bar, "close"):
            self.bar.close()
        space = self.evaluator.space
        average = space.average(bits)
        plan = space.to_plan(bits, target.act_bits, allocator=allocator, target=target.label(),
                             target_weight_bits=target.weight_bits, max_bits=target.max_bits,
                             average_bits=round(average, 6), knobs=knobs)
        cost = {"evaluations": self.evaluator.evaluations - self.evaluations_at_start,
                "evaluation_seconds": round(self.evaluator.seconds - self.seconds_at_start, 3),
                "search_seconds": round(time.perf_counter() - self.started, 3),
                "validation_images": self.evaluator.images, "bn_images": getattr(self.evaluator, "bn_images", 0)}
        return AllocationResult(plan, pd.DataFrame(self.rows), cost, accuracy, details or {})
