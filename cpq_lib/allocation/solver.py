"""The exact bit assignment: one width per group (a layer, or a channel) minimising a summed
sensitivity under linear budgets, as an integer program (HAWQ-V3's formulation).

Variables ``x[g, k]`` in {0, 1} say that group ``g`` takes width ``widths[k]``; each group takes
exactly one; every budget is ``sum_g,k cost[g, k] * x[g, k] <= limit`` (average weight bits:
``cost = params_g * width_k`` against ``max_bits * params``; BitOPs; bytes). Solved by HiGHS through
``scipy.optimize.milp`` (scipy is already a dependency), to optimality: the solver's status is
checked, and a plan that breaks a budget by more than rounding is refused, never returned.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .space import AllocationError


@dataclass(frozen=True)
class Budget:
    """``sum cost[g, k] * x[g, k] <= limit``; ``name`` says what is counted (for errors and records)."""

    name: str
    cost: np.ndarray  # (groups, widths)
    limit: float


@dataclass
class Assignment:
    choice: np.ndarray  # (groups,) index into the widths
    objective: float
    spent: dict[str, float]  # budget name -> what the assignment spends


def solve_assignment(sensitivity: np.ndarray, budgets: list[Budget], time_limit: float = 120.0) -> Assignment:
    """The width index per group minimising ``sum sensitivity[g, choice[g]]`` within every budget.

    ``sensitivity`` is (groups, widths); raises AllocationError when no assignment fits the budgets
    (even the cheapest width everywhere breaks one) or the solver does not prove optimality in time.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp

    omega = np.asarray(sensitivity, dtype=np.float64)
    if omega.ndim != 2 or omega.size == 0 or not np.isfinite(omega).all():
        raise AllocationError(f"sensitivities must be a finite (groups, widths) table, got shape {omega.shape}")
    groups, widths = omega.shape
    for budget in budgets:
        if np.shape(budget.cost) != omega.shape:
            raise AllocationError(f"budget {budget.name!r}: costs have shape {np.shape(budget.cost)}, expected {omega.shape}")
    cheapest = {b.name: float(np.min(b.cost, axis=1).sum()) for b in budgets}
    for budget in budgets:
        if cheapest[budget.name] > budget.limit * (1 + 1e-12) + 1e-9:
            raise AllocationError(f"budget {budget.name!r} cannot be met: the cheapest width in every group spends "
                                  f"{cheapest[budget.name]:.6g}, the limit is {budget.limit:.6g}")
    one_each = np.zeros((groups, groups * widths))
    for g in range(groups):
        one_each[g, g * widths:(g + 1) * widths] = 1.0
    constraints = [LinearConstraint(one_each, 1.0, 1.0)]
    # each budget row scaled to order 1, and its limit lowered by twice HiGHS's feasibility tolerance
    # (1e-7): a solution the solver accepts as feasible then never spends more than the true limit
    for budget in budgets:
        cost = np.asarray(budget.cost, dtype=np.float64).reshape(1, -1)
        norm = max(abs(budget.limit), float(np.abs(cost).max()), 1e-300)
        constraints.append(LinearConstraint(cost / norm, -np.inf, budget.limit / norm - 2e-7))
    # centre each group's sensitivities (a constant per group changes no choice) to help the solver's tolerances
    shifted = omega - omega.min(axis=1, keepdims=True)
    result = milp(shifted.reshape(-1), integrality=np.ones(groups * widths), bounds=Bounds(0, 1),
                  constraints=constraints, options={"time_limit": time_limit, "mip_rel_gap": 0.0})
    if result.status != 0 or result.x is None:
        raise AllocationError(f"the bit-assignment program was not solved to optimality: {result.message}")
    choice = np.asarray(result.x).reshape(groups, widths).argmax(axis=1)
    picked = np.zeros_like(omega)
    picked[np.arange(groups), choice] = 1.0
    spent = {b.name: float((np.asarray(b.cost) * picked).sum()) for b in budgets}
    for budget in budgets:  # rounding of the relaxed solution must not break a budget
        if spent[budget.name] > budget.limit + 1e-9 * max(1.0, abs(budget.limit)):
            raise AllocationError(f"the solver's assignment spends {spent[budget.name]:.9g} of budget "
                                  f"{budget.name!r} (limit {budget.limit:.9g})")
    return Assignment(choice, float(omega[np.arange(groups), choice].sum()), spent)


def average_bits_budget(params: np.ndarray, widths: list[int], max_bits: float) -> Budget:
    """The budget every allocator shares: parameter-weighted average weight bits at most ``max_bits``."""
    params = np.asarray(params, dtype=np.float64)
    return Budget("average weight bits", params[:, None] * np.asarray(widths, dtype=np.float64)[None, :],
                  float(max_bits * params.sum()))
