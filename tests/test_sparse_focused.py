"""Focused quantizer: mixture and switch rule, overflow rule, codes and levels, straight-through module."""

from __future__ import annotations

import math

import pytest
import torch

from cpq_lib.sparse.focused import (
    FocusedWeightQuantizer, decode_levels, exponent_count, fit_mixture, overflow_exponent, plan_layer, quantize_levels,
)


def _bimodal(n: int = 4000, seed: int = 0, sparsity: float = 0.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    w = sign * (0.5 + 0.06 * torch.randn(n, generator=g))
    w[torch.rand(n, generator=g) < sparsity] = 0.0
    return w.view(-1, 100 if n % 100 == 0 else 1, 1, 1).double()


def _unimodal(n: int = 4000, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (0.1 * torch.randn(n, generator=g)).view(-1, 100 if n % 100 == 0 else 1, 1, 1).double()


def test_switch_rule_focuses_separated_modes_only():
    separated, _, component = plan_layer(_bimodal(sparsity=0.5), bits=5)
    mixture = fit_mixture(_bimodal(sparsity=0.5))
    assert mixture.separation > 2 and separated.focused and len(separated.centres) == 2
    assert mixture.means[0] == pytest.approx(0.5, abs=0.01) and mixture.means[1] == pytest.approx(-0.5, abs=0.01)
    assert set(component.unique().tolist()) == {0, 1}
    plain, mixture, _ = plan_layer(_unimodal(), bits=5)
    assert mixture.separation < 2 and not plain.focused and plain.centres == (0.0,)
    forced, _, _ = plan_layer(_bimodal(), bits=5, separation_threshold=1e9)  # the threshold decides
    assert not forced.focused


@pytest.mark.parametrize("bits", [2, 3, 5, 8])
def test_overflow_rule_is_met_and_tight(bits):
    magnitudes = torch.rand(10_000, generator=torch.Generator().manual_seed(bits)).double() ** 3
    e_max = overflow_exponent(magnitudes, bits)
    allowed = 1 / (2 ** bits + 1)
    assert float((magnitudes > 2.0 ** e_max).double().mean()) <= allowed
    assert float((magnitudes > 2.0 ** (e_max - 1)).double().mean()) > allowed  # one exponent lower clips too many


@pytest.mark.parametrize("levels", ["paper", "log2"])
@pytest.mark.parametrize("bits", [3, 5])
@pytest.mark.parametrize("make", [_bimodal, _unimodal])
def test_codes_levels_and_round_trip(bits, make, levels):
    weight = make()
    weight.view(-1)[::7] = 0.0  # pruned positions
    layout, _, component = plan_layer(weight, bits, levels=levels)
    codes, values = quantize_levels(weight, layout, component)
    assert torch.equal(decode_levels(codes, layout), values.double())
    assert bool((values[weight == 0] == 0).all()) and bool((codes[weight == 0] == -1).all())
    used = codes[codes >= 0]
    assert used.max() < 2 ** bits and layout.exponents == exponent_count(bits, layout.focused, levels)
    centres = torch.tensor(layout.centres, dtype=torch.float64)[component]
    spreads = torch.tensor(layout.spreads, dtype=torch.float64)[component]
    ratio = ((values.double() - centres) / spreads)[weight != 0].abs()
    zero = ratio < 1e-12  # the zero level: the weight sits at its component's centre
    assert bool(zero.any()) == (levels == "paper")  # the paper's set has a zero level, the log2 set not
    exponents = torch.log2(ratio[~zero])
    assert torch.allclose(exponents, exponents.round(), atol=1e-9)  # every other level is centre +- spread * 2^e
    assert int(exponents.round().min()) >= layout.e_min and int(exponents.round().max()) <= layout.e_max


def test_paper_levels_round_to_the_nearest_value_and_count_as_the_paper_says():
    weight = _bimodal(sparsity=0.3)
    layout, _, component = plan_layer(weight, bits=5)
    assert layout.focused and layout.zero_level and layout.exponents == 4  # 2^(5-3) exponents plus zero
    assert plan_layer(_unimodal(), bits=5)[0].exponents == 8             # plain: a 5-bit shift quantizer, 2^(5-2)
    _, values = quantize_levels(weight, layout, component)
    centres = torch.tensor(layout.centres, dtype=torch.float64)[component]
    spreads = torch.tensor(layout.spreads, dtype=torch.float64)[component]
    z = ((weight - centres) / spreads)[weight != 0]
    grid = torch.tensor([0.0] + [s * 2.0 ** e for e in range(layout.e_min, layout.e_max + 1) for s in (1, -1)], dtype=torch.float64)
    nearest = (z[:, None] - grid[None, :]).abs().min(1).values  # brute force over every representable value
    chosen = (((values.double() - centres) / spreads)[weight != 0] - z).abs()
    torch.testing.assert_close(chosen, nearest, rtol=0, atol=1e-12)
    # the log2 set spends the zero and sign codes on exponents: its n bits have the paper's n + 1 exponents
    assert all(exponent_count(n, f, "log2") == exponent_count(n + 1, f, "paper") for n in (3, 4, 5) for f in (True, False))
    assert not plan_layer(_bimodal(), bits=2)[0].focused  # no room for a component bit at 2 bits: plain (ternary)
    with pytest.raises(ValueError, match="focused 2-bit code has no room"):
        exponent_count(2, True, "paper")


def test_sampled_assignment_follows_the_posterior_reproducibly():
    g = torch.Generator().manual_seed(5)  # overlapping modes: many weights near the boundary
    sign = torch.where(torch.rand(4000, generator=g) < 0.5, -1.0, 1.0)
    weight = (sign * (0.3 + 0.25 * torch.randn(4000, generator=g))).view(40, 100, 1, 1).double()
    argmax = plan_layer(weight, bits=5, separation_threshold=0.0)[2]
    first = plan_layer(weight, bits=5, separation_threshold=0.0, assignment="sample", seed=1)[2]
    again = plan_layer(weight, bits=5, separation_threshold=0.0, assignment="sample", seed=1)[2]
    other = plan_layer(weight, bits=5, separation_threshold=0.0, assignment="sample", seed=2)[2]
    assert torch.equal(first, again) and not torch.equal(first, other)
    disagree = float((first != argmax).double().mean())
    assert 0.01 < disagree < 0.3  # samples differ near the boundary only
    far = weight.abs() > 0.6
    assert bool((first[far] == argmax[far]).all())
    with pytest.raises(ValueError, match="assignment 'random' is not allowed"):
        plan_layer(weight, bits=5, assignment="random")


def test_hardware_variant_has_power_of_two_centres_and_one_spread():
    layout = plan_layer(_bimodal(sparsity=0.3), bits=5, hardware=True)[0]
    assert layout.focused and layout.spreads[0] == layout.spreads[1]
    for centre in layout.centres:
        assert math.log2(abs(centre)) == round(math.log2(abs(centre)))
    assert layout.centres == (0.5, -0.5)


def test_refit_follows_the_weights_and_keeps_the_mode_and_shapes():
    weight = _bimodal(sparsity=0.4).float()
    quantizer = FocusedWeightQuantizer(weight, bits=5)
    shapes = {k: v.shape for k, v in quantizer.state_dict().items()}
    assert quantizer.layout.centres[0] == pytest.approx(0.5, abs=0.01)
    quantizer.refit(weight * 1.5)  # the modes moved during fine-tuning
    assert quantizer.layout.centres[0] == pytest.approx(0.75, abs=0.015) and quantizer.layout.focused
    assert {k: v.shape for k, v in quantizer.state_dict().items()} == shapes and int(quantizer.refits) == 1
    fresh = FocusedWeightQuantizer(weight, bits=5)
    fresh.load_state_dict(quantizer.state_dict())  # a resumed run gets the refitted layout back
    assert fresh.layout == quantizer.layout and torch.equal(fresh.component, quantizer.component)


def test_more_bits_less_error():
    weight = _bimodal(sparsity=0.3)
    errors = []
    for bits in (3, 4, 5, 6):
        layout, _, component = plan_layer(weight, bits)
        assert layout.focused
        _, levels = quantize_levels(weight, layout, component)
        errors.append(float((levels - weight).norm()))
    assert all(a > b for a, b in zip(errors, errors[1:]))


def test_module_straight_through_and_incremental_fraction():
    weight = _bimodal(sparsity=0.4).float().requires_grad_(True)
    quantizer = FocusedWeightQuantizer(weight.detach(), bits=4, fraction=0.5)
    held = quantizer.held
    nonzero = weight.detach() != 0
    assert int(held.sum()) == round(0.5 * int(nonzero.sum()))
    assert weight.detach().abs()[held].min() >= weight.detach().abs()[nonzero & ~held].max()  # largest first
    with torch.no_grad():
        quantizer.alpha.fill_(2.0)
    out = quantizer(weight)
    _, levels = quantize_levels(weight.detach(), quantizer.layout, quantizer.component)
    assert torch.allclose(out[held], 2.0 * levels.float()[held]) and torch.equal(out[~held], weight.detach()[~held])
    out.sum().backward()
    assert torch.allclose(weight.grad[held], torch.full_like(weight.grad[held], 2.0))
    assert torch.allclose(weight.grad[~held], torch.ones_like(weight.grad[~held]))
    assert quantizer.alpha.grad is not None and float(quantizer.alpha.grad) == pytest.approx(float(levels.float()[held].sum()), rel=1e-5)


def test_bad_inputs_get_clear_errors():
    with pytest.raises(ValueError, match="bits must be an integer from 2"):
        plan_layer(_bimodal(), bits=1)
    with pytest.raises(ValueError, match="no non-zero weights"):
        plan_layer(torch.zeros(4, 4), bits=4)
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\]"):
        FocusedWeightQuantizer(_bimodal(), bits=4, fraction=1.5)
    assert math.isfinite(fit_mixture(_bimodal()).separation)


@pytest.mark.parametrize("levels", ["paper", "log2"])
@pytest.mark.parametrize("make,stride,padding", [(_bimodal, 1, 1), (_unimodal, 2, 0)])
def test_shift_and_add_convolution_equals_the_fake_quantized_one(make, stride, padding, levels):
    import torch.nn.functional as F

    from cpq_lib.sparse.shift import integer_sums, shift_add_conv2d

    weight = make(n=8 * 4 * 9).view(8, 4, 3, 3)
    weight.view(-1)[::5] = 0.0
    layout, _, component = plan_layer(weight, bits=4, levels=levels)
    codes, levels = quantize_levels(weight, layout, component)
    alpha, step = 0.75, 0.05
    x_int = torch.randint(0, 16, (2, 4, 7, 7), generator=torch.Generator().manual_seed(3))  # 4-bit unsigned activations
    reference = F.conv2d(x_int.double() * step, alpha * levels.double(), stride=stride, padding=padding)
    shifted = shift_add_conv2d(x_int, step, codes, layout, alpha, stride=stride, padding=padding)
    torch.testing.assert_close(shifted, reference, rtol=1e-12, atol=1e-12)
    a, b = integer_sums(x_int, codes, layout, stride, padding)
    assert a.dtype == torch.long and b.dtype == torch.long and a.shape[0] == len(layout.centres)
    with pytest.raises(ValueError, match="integer tensor"):
        integer_sums(x_int.float(), codes, layout)
