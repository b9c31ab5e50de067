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


@pytest.mark.parametrize("bits", [3, 5])
@pytest.mark.parametrize("make", [_bimodal, _unimodal])
def test_codes_levels_and_round_trip(bits, make):
    weight = make()
    weight.view(-1)[::7] = 0.0  # pruned positions
    layout, _, component = plan_layer(weight, bits)
    codes, levels = quantize_levels(weight, layout, component)
    assert torch.equal(decode_levels(codes, layout), levels.double())
    assert bool((levels[weight == 0] == 0).all()) and bool((codes[weight == 0] == -1).all())
    used = codes[codes >= 0]
    assert used.max() < 2 ** bits and layout.exponents == exponent_count(bits, layout.focused)
    centres = torch.tensor(layout.centres, dtype=torch.float64)[component]
    spreads = torch.tensor(layout.spreads, dtype=torch.float64)[component]
    ratio = ((levels.double() - centres) / spreads)[weight != 0].abs()
    exponents = torch.log2(ratio)
    assert torch.allclose(exponents, exponents.round(), atol=1e-9)  # every level is centre +- spread * 2^e
    assert int(exponents.round().min()) >= layout.e_min and int(exponents.round().max()) <= layout.e_max


def test_more_bits_less_error():
    weight = _bimodal(sparsity=0.3)
    errors = []
    for bits in (3, 4, 5, 6):
        layout, _, component = plan_layer(weight, bits)
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


@pytest.mark.parametrize("make,stride,padding", [(_bimodal, 1, 1), (_unimodal, 2, 0)])
def test_shift_and_add_convolution_equals_the_fake_quantized_one(make, stride, padding):
    import torch.nn.functional as F

    from cpq_lib.sparse.shift import integer_sums, shift_add_conv2d

    weight = make(n=8 * 4 * 9).view(8, 4, 3, 3)
    weight.view(-1)[::5] = 0.0
    layout, _, component = plan_layer(weight, bits=4)
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
