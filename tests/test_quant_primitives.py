"""Properties of the fake-quantization primitive (hypothesis)."""

import math

import pytest
import torch
from hypothesis import given, settings, strategies as st

from cpq_lib.quant.primitives import (
    asymmetric_params, fake_quantize, fake_quantize_per_tensor, integer_range, max_scale, quantize_to_codes, round_to_level,
)

FLOATS = st.floats(min_value=-100, max_value=100, allow_nan=False, allow_infinity=False, width=32)
VECTORS = st.lists(FLOATS, min_size=1, max_size=64).map(lambda v: torch.tensor(v, dtype=torch.float32))
SCALES = st.floats(min_value=0.0009765625, max_value=8.0, allow_nan=False, width=32)
BITS = st.integers(min_value=2, max_value=16)


def test_integer_ranges():
    qmin, qmax = integer_range(torch.tensor([0, 1, 2, 4, 8, 16]), signed=True)
    assert qmax.tolist() == [0, 1, 1, 7, 127, 32767] and torch.equal(qmin, -qmax)
    qmin, qmax = integer_range(torch.tensor([0, 1, 2, 8]), signed=False)
    assert qmax.tolist() == [0, 1, 3, 255] and qmin.tolist() == [0, 0, 0, 0]


@settings(max_examples=200, deadline=None)
@given(VECTORS, SCALES, BITS)
def test_error_at_most_half_a_step_inside_the_range(x, scale, bits):
    _, qmax = integer_range(bits, signed=True)
    s = torch.tensor(scale)
    inside = x.abs() <= float(qmax) * scale
    out = fake_quantize(x, s, None, -qmax, qmax)
    bound = scale / 2 + 1e-5 * (1 + x.abs())
    assert ((out - x).abs()[inside] <= bound[inside]).all()


@settings(max_examples=200, deadline=None)
@given(VECTORS, SCALES, st.integers(min_value=0, max_value=16), st.booleans())
def test_idempotent(x, scale, bits, signed):
    qmin, qmax = integer_range(bits, signed)
    binary = torch.tensor(bits == 1 and signed)
    once = fake_quantize(x, torch.tensor(scale), None, qmin, qmax, binary)
    assert torch.equal(fake_quantize(once, torch.tensor(scale), None, qmin, qmax, binary), once)


@settings(max_examples=100, deadline=None)
@given(VECTORS.filter(lambda v: float(v.abs().max()) > 1e-3))
def test_max_scaled_bound_shrinks_with_bits(x):
    """With the max scale every value is inside the range: error <= s_b / 2, and s_b halves per bit."""
    absmax = x.abs().max()
    previous = float("inf")
    for bits in range(2, 17):
        scale = max_scale(absmax, bits, signed=True)
        qmin, qmax = integer_range(bits, signed=True)
        error = (fake_quantize(x, scale, None, qmin, qmax) - x).abs().max()
        assert float(error) <= float(scale) / 2 + 1e-5 * float(absmax)
        assert float(scale) < previous
        previous = float(scale)


@settings(max_examples=100, deadline=None)
@given(st.integers(2, 6), st.integers(1, 20), st.integers(0, 5), st.data())
def test_channels_are_independent(channels, width, changed, data):
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 10_000)))
    x = torch.randn(channels, width, generator=generator)
    bits = torch.randint(0, 9, (channels, 1), generator=generator)
    scale = x.abs().amax(1, keepdim=True) / 7 + 1e-3
    qmin, qmax = integer_range(bits, signed=True)
    binary = bits == 1
    before = fake_quantize(x, scale, None, qmin, qmax, binary)
    changed %= channels
    y = x.clone()
    y[changed] = torch.randn(width, generator=generator) * 5
    after = fake_quantize(y, scale, None, qmin, qmax, binary)
    others = torch.arange(channels) != changed
    assert torch.equal(before[others], after[others])


def test_one_bit_is_the_sign_and_zero_bits_is_zero():
    x = torch.tensor([-2.0, -0.1, 0.0, 0.3, 5.0])
    s = torch.tensor(0.7)
    binary = fake_quantize(x, s, None, -1, 1, torch.tensor(True))
    assert torch.equal(binary, s * torch.tensor([-1.0, -1.0, 1.0, 1.0, 1.0]))
    assert torch.equal(fake_quantize(x, s, None, 0, 0), torch.zeros(5))
    ternary = fake_quantize(x, s, None, -1, 1)  # signed 2 bits: {-s, 0, s}
    assert set(torch.round(ternary / 0.7).tolist()) <= {-1.0, 0.0, 1.0} and float(ternary[2]) == 0.0


def test_zero_scale_gives_zeros_not_nan():
    x = torch.zeros(3, 4, requires_grad=True)
    out = fake_quantize(x, torch.zeros(3, 1), None, -7, 7)
    out.sum().backward()
    assert torch.equal(out, torch.zeros(3, 4)) and torch.isfinite(x.grad).all()


@settings(max_examples=100, deadline=None)
@given(VECTORS, SCALES, BITS)
def test_gradient_passes_straight_through_inside_and_stops_outside(x, scale, bits):
    x = x.clone().requires_grad_(True)
    _, qmax = integer_range(bits, signed=True)
    fake_quantize(x, torch.tensor(scale), None, -qmax, qmax).sum().backward()
    rounded = torch.round(x.detach() * (1.0 / torch.tensor(scale)))
    inside = (rounded >= -qmax) & (rounded <= qmax)
    assert torch.equal(x.grad, inside.float())


@settings(max_examples=100, deadline=None)
@given(VECTORS, SCALES, st.integers(2, 16), st.booleans())
def test_fused_per_tensor_path_matches_generic_path(x, scale, bits, signed):
    qmin, qmax = integer_range(bits, signed)
    generic = fake_quantize(x, torch.tensor(scale), None, qmin, qmax)
    fused = fake_quantize_per_tensor(x, torch.tensor(scale), torch.zeros(1, dtype=torch.int32), int(qmin), int(qmax))
    assert torch.equal(generic, fused)


def test_lsq_scale_gradient_matches_the_straight_through_chain():
    torch.manual_seed(0)
    groups = []
    for step in (0.2, 0.5):
        x = torch.randn(100) * 3
        # keep clear of the range boundary, where STE conventions differ (torch.clamp vs fake_quantize)
        groups.append(x[torch.round(x / step).abs() != 7][:80])
    x = torch.cat(groups)
    weights = torch.linspace(-1, 1, 160)
    s1 = torch.tensor([0.2, 0.5], requires_grad=True)
    out = fake_quantize(x, s1.repeat_interleave(80), None, -7, 7, grad_factor=0.5)
    (out * weights).sum().backward()
    s2 = torch.tensor([0.2, 0.5], requires_grad=True)
    expanded = s2.repeat_interleave(80)
    v = x / expanded
    rounded = v + (torch.round(v) - v).detach()
    reference = torch.clamp(rounded, -7, 7) * expanded
    (reference * weights * 0.5).sum().backward()
    assert torch.allclose(s1.grad, s2.grad, rtol=1e-4, atol=1e-5)
    assert torch.allclose(out, reference)


@settings(max_examples=100, deadline=None)
@given(VECTORS, st.integers(2, 12))
def test_asymmetric_grid_covers_the_range(x, bits):
    scale, zero_point = asymmetric_params(x.min(), x.max(), bits)
    qmin, qmax = integer_range(bits, signed=False)
    out = fake_quantize(x, scale, zero_point, qmin, qmax)
    assert ((out - x).abs() <= scale / 2 + 1e-4 * (1 + x.abs())).all()
    assert float(fake_quantize(torch.zeros(1), scale, zero_point, qmin, qmax)) == 0.0  # zero is exact


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", ["tensor", "channel", "asymmetric", "binary", "bounds-wider-than-x"])
def test_in_place_path_equals_the_reference_chain_bit_for_bit(dtype, case):
    from cpq_lib.quant.primitives import _dequantize, _quantize_codes, safe_scale

    g = torch.Generator().manual_seed(3)
    x = torch.randn(6, 5, 3, generator=g, dtype=dtype) * 3
    scale = torch.rand(6, 1, 1, generator=g, dtype=dtype) + 0.05
    zero_point, binary = None, None
    bits = torch.tensor([2, 3, 4, 1, 8, 5]).view(6, 1, 1)
    qmin, qmax = integer_range(bits, signed=True)
    if case == "tensor":
        scale, qmin, qmax = scale[0, 0, 0], qmin[2], qmax[2]
    elif case == "asymmetric":
        qmin, qmax = integer_range(bits, signed=False)
        zero_point = torch.randint(0, 3, (6, 1, 1), generator=g).to(dtype)
    elif case == "binary":
        binary = bits == 1
    elif case == "bounds-wider-than-x":  # per-channel bounds widen a per-tensor product: the out-of-place path
        x, scale = x[:1], scale[0, 0, 0]
    qmin, qmax = qmin.to(dtype), qmax.to(dtype)
    safe = safe_scale(scale)
    reference = _dequantize(_quantize_codes(x, 1.0 / safe, zero_point, qmin, qmax, binary), safe, zero_point)
    with torch.no_grad():
        result = fake_quantize(x, scale, zero_point, qmin, qmax, binary)
    assert result.shape == reference.shape and result.dtype == reference.dtype
    assert torch.equal(result, reference)
    assert not torch.equal(result, x)  # it quantized something


def test_float64_rounding_takes_values_within_the_window_of_a_half_as_the_half():
    ulp = math.ulp(2.5)
    near = torch.tensor([2.5 + k * ulp for k in range(-3000, 3001, 7)], dtype=torch.float64)
    assert set(round_to_level(near).tolist()) == {2.0}  # halves to even, whichever side the last bits fell
    assert set(round_to_level(-near + 1.0).tolist()) == {-2.0}  # -1.5 and its neighbours
    clear = torch.tensor([2.5 - 1e-9, 2.5 + 1e-9, 3.49, -0.7, 0.0], dtype=torch.float64)
    assert round_to_level(clear).tolist() == [2.0, 3.0, 3.0, -1.0, 0.0]  # elsewhere: torch.round
    as_float32 = torch.tensor([2.5, float(torch.tensor(2.5, dtype=torch.float32).nextafter(torch.tensor(3.0)))])
    assert round_to_level(as_float32).tolist() == [2.0, 3.0]  # float32 rounds as computed


def test_codes_at_the_full_grids_start_do_not_depend_on_the_weights_last_bits():
    """The full grid's start scale puts a negative maximum exactly on the half -(2^(b-1) - 0.5): its code
    is the grid's lowest whatever last bits training left (here: the same weights, perturbed by ulps)."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(64, 27, generator=generator, dtype=torch.float64)
    weight[:, 0] = -weight.abs().amax(1) * 1.01  # every row's largest magnitude is negative
    for bits in (2, 3, 4):
        qmin, qmax = integer_range(bits, signed=True, narrow=False)
        codes = set()
        for k in range(-40, 41, 3):
            perturbed = weight * (1 + k * 2.0 ** -52)
            scale = max_scale(perturbed.abs().amax(1, keepdim=True), bits, signed=True, narrow=False)
            codes |= set(quantize_to_codes(perturbed, scale.to(weight.dtype), None, qmin.double(), qmax.double())[:, 0].tolist())
        assert codes == {float(qmin)}, (bits, codes)


def test_backward_uses_the_codes_the_forward_chose():
    """The forward computes x * (1/s); a backward computing x / s rounded some values near a half to the
    other code (about 8% of float32 values placed at k + 1/2 steps), so the scale's gradient and the
    straight-through mask described a code the forward never used."""
    generator = torch.Generator().manual_seed(0)
    scale = torch.rand(20000, generator=generator) * 0.1 + 0.01
    x = (torch.randint(-4, 3, (20000,), generator=generator).float() + 0.5) * scale
    differ = torch.round(x * (1.0 / scale)) != torch.round(x / scale)
    assert differ.sum() > 100  # the values where the two arithmetics disagree are there to be tested
    scale = scale.clone().requires_grad_(True)
    out = fake_quantize(x, scale, None, -8, 7)
    out.sum().backward()
    codes = (out / scale).detach().round()
    expected = codes - x * (1.0 / scale.detach())  # LSQ's local gradient inside the grid, with the forward's codes
    assert torch.allclose(scale.grad[differ], expected[differ], atol=1e-5)
