"""Learning-rate schedules as pure functions of the step, so a resumed run needs no scheduler state."""

from __future__ import annotations

import math

SCHEDULES = ("onecycle", "cosine", "step", "constant")


def learning_rate(step: int, total_steps: int, base_lr: float, schedule: str, *, warmup_steps: int = 0,
                  milestones: tuple[float, ...] = (0.5, 0.75), gamma: float = 0.1, pct_start: float = 0.15) -> float:
    """Learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    onecycle: linear rise from base/25 to base over ``pct_start`` of the run, then cosine to ~0;
    cosine: optional linear warm-up, then cosine from base to 0; step: times ``gamma`` at each
    milestone (fractions of the run); constant: base.
    """
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; allowed: {', '.join(SCHEDULES)}")
    progress = step / max(1, total_steps)
    if schedule == "onecycle":
        rise = max(1, round(pct_start * total_steps))
        if step < rise:
            return base_lr * (0.04 + 0.96 * step / rise)
        fall = (step - rise) / max(1, total_steps - rise)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, fall)))
    if step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "cosine":
        fall = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return base_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, fall)))
    if schedule == "step":
        return base_lr * gamma ** sum(progress >= m for m in milestones)
    return base_lr
