import itertools

import numpy as np
import pytest
import torch
from torch import nn

from cpq_lib.allocation.hessian import exact_traces, hutchinson_traces, perturbation_sensitivity, relative_error
from cpq_lib.allocation.solver import Budget, average_bits_budget, solve_assignment
from cpq_lib.allocation.space import AllocationError


def _small_model_and_batch():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(2, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3 * 3, 3)).double()
    images = torch.randn(24, 2, 5, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    labels = torch.randint(0, 3, (24,), generator=torch.Generator().manual_seed(2))
    return model, images, labels


def test_hutchinson_traces_match_the_exact_hessian_within_5_percent():
    model, images, labels = _small_model_and_batch()
    parameters = {"conv": model[0].weight, "fc": model[3].weight}
    exact = exact_traces(model, images, labels, parameters)
    # two batches of the same images: the mean loss over batches is the loss of the whole set
    estimate = hutchinson_traces(model, [(images[:12], labels[:12]), (images[12:], labels[12:])], parameters,
                                 max_probes=3000, min_probes=8, tolerance=1e-12, seed=0)
    assert estimate.probes == 3000 and estimate.hessian_vector_products == 6000 and not estimate.converged
    for name in parameters:
        total = float(exact[name].sum())
        assert abs(total) > 1e-3  # a trace clearly away from zero: the relative error means something
        assert relative_error(estimate.per_layer[name], total) < 0.05, (name, estimate.per_layer[name], total)
    # per channel: the biggest channels' traces within 10% (each is a smaller sum, so noisier)
    channels = exact["fc"]
    estimated = estimate.per_channel["fc"]
    for c in range(len(channels)):
        if abs(float(channels[c])) > 0.2 * float(channels.abs().max()):
            assert relative_error(float(estimated[c]), float(channels[c])) < 0.10


def test_traces_are_seeded_and_stop_when_the_running_mean_settles():
    model, images, labels = _small_model_and_batch()
    parameters = {"conv": model[0].weight, "fc": model[3].weight}
    first = hutchinson_traces(model, [(images, labels)], parameters, max_probes=400, tolerance=1e-2, seed=3)
    again = hutchinson_traces(model, [(images, labels)], parameters, max_probes=400, tolerance=1e-2, seed=3)
    other = hutchinson_traces(model, [(images, labels)], parameters, max_probes=400, tolerance=1e-2, seed=4)
    assert first.per_layer == again.per_layer and first.probes == again.probes
    assert first.per_layer != other.per_layer
    assert first.converged and 8 <= first.probes < 400
    assert model.training  # the caller's mode is restored (eval inside)
    with pytest.raises(AllocationError, match="min_probes must be an integer in 1..max_probes"):
        hutchinson_traces(model, [(images, labels)], parameters, max_probes=4, min_probes=5)
    with pytest.raises(AllocationError, match="at least one batch"):
        hutchinson_traces(model, [], parameters)


def test_perturbation_sensitivity_is_hawq_omega_with_negative_traces_as_zero():
    traces = torch.tensor([2.0, -1.0, 0.5], dtype=torch.float64)
    errors = torch.tensor([[4.0, 1.0], [4.0, 1.0], [8.0, 2.0]], dtype=torch.float64)
    omega = perturbation_sensitivity(traces, errors, params_per_channel=2)
    assert torch.equal(omega, torch.tensor([[4.0, 1.0], [0.0, 0.0], [2.0, 0.5]], dtype=torch.float64))


def _brute_force(omega, budgets):
    best, best_choice = np.inf, None
    groups, widths = omega.shape
    for choice in itertools.product(range(widths), repeat=groups):
        index = (np.arange(groups), np.array(choice))
        if all(b.cost[index].sum() <= b.limit + 1e-9 for b in budgets):
            value = omega[index].sum()
            if value < best - 1e-12:
                best, best_choice = value, np.array(choice)
    return best, best_choice


@pytest.mark.parametrize("seed", range(6))
def test_solver_equals_brute_force_and_never_exceeds_a_budget(seed):
    rng = np.random.default_rng(seed)
    groups, widths = 6, [2, 3, 4, 6]
    params = rng.integers(9, 600, groups)
    # sensitivities fall with width, as quantization error does
    omega = np.sort(rng.gamma(1.0, 1.0, (groups, len(widths))), axis=1)[:, ::-1] * rng.uniform(0.1, 10, (groups, 1))
    budgets = [average_bits_budget(params, widths, 3.1)]
    if seed % 2:  # and a BitOPs-like budget with other weights per group
        macs = rng.integers(1_000, 50_000, groups).astype(float)
        bitops = macs[:, None] * np.asarray(widths)[None, :] * 4
        budgets.append(Budget("bitops", bitops, float(bitops[:, 1].sum())))
    found = solve_assignment(omega, budgets)
    best, _ = _brute_force(omega, budgets)
    assert found.objective == pytest.approx(best, rel=1e-9, abs=1e-12)
    for budget in budgets:
        assert found.spent[budget.name] <= budget.limit
    average = (params * np.asarray(widths)[found.choice]).sum() / params.sum()
    assert average <= 3.1 and found.spent["average weight bits"] == pytest.approx(average * params.sum())


def test_solver_refuses_budgets_nothing_meets_and_bad_tables():
    params = np.array([10, 20])
    with pytest.raises(AllocationError, match="cannot be met: the cheapest width in every group spends 60"):
        solve_assignment(np.ones((2, 2)), [average_bits_budget(params, [2, 4], 1.5)])
    with pytest.raises(AllocationError, match="finite"):
        solve_assignment(np.array([[1.0, np.nan]]), [])
    with pytest.raises(AllocationError, match="costs have shape"):
        solve_assignment(np.ones((2, 2)), [Budget("x", np.ones((3, 2)), 5.0)])


def test_equal_class_weights_give_back_the_plain_trace_and_weights_shift_it():
    """The class-aware trace's ablation claim, exactly: with balanced classes, the equal-weight mean of
    the per-class traces is the trace of the mean loss."""
    from cpq_lib.allocation.hawq import weighted_class_traces
    from cpq_lib.allocation.hessian import TraceEstimate

    model, images, _ = _small_model_and_batch()
    labels = torch.arange(24) % 3  # 8 images per class
    parameters = {"conv": model[0].weight, "fc": model[3].weight}
    whole = exact_traces(model, images, labels, parameters)
    per_class = {c: TraceEstimate({}, exact_traces(model, images[labels == c], labels[labels == c], parameters), 1, 1, 0.0, True)
                 for c in range(3)}
    equal = weighted_class_traces(per_class, torch.ones(3))
    for name in parameters:
        assert torch.allclose(equal[name], whole[name], rtol=1e-10, atol=1e-12)
    only_first = weighted_class_traces(per_class, torch.tensor([1.0, 0.0, 0.0]))
    assert torch.equal(only_first["fc"], per_class[0].per_channel["fc"])
    assert not torch.allclose(only_first["fc"], whole["fc"])
