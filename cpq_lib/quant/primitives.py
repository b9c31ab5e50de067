"""Pure fake-quantization primitives: no modules, no state.

One function, :func:`fake_quantize`, covers every granularity: the shapes of ``scale``,
``zero_point``, ``qmin`` and ``qmax`` broadcast against ``x`` (a scalar per tensor, ``(C, 1, 1, 1)``
per output channel, the full weight shape per block). Bit-widths are tensors too, so channels of one
layer can hold 0, 1, 2, ... 16 bits without a Python loop.

Grids (``integer_range``): signed b >= 2 bits is the narrow symmetric range [-(2^(b-1)-1), 2^(b-1)-1]
by default, or with ``narrow=False`` the full two's-complement range [-2^(b-1), 2^(b-1)-1] (LSQ's: four
levels at 2 bits instead of the ternary {-1, 0, 1}); signed 1 bit is the sign {-1, +1} (``binary``) on
either; unsigned b bits is [0, 2^b - 1]; 0 bits is zero.

Rounding is to the nearest level, halves to even. In float64 (the precision of the `quick` profile
and of cross-CPU reproducibility) a value within a relative 2^-36 of a half is that half
(:func:`round_to_level`): scales are often chosen so that a weight lands exactly on a half in exact
arithmetic (the full grid's start ``max / (2^(b-1) - 0.5)`` puts a negative maximum there, a search grid
``scale0 * 1.2`` at 3 bits puts the maximum at 2.5), and the last bits a CPU's summation order left in
the weights then decided the code, so the same notebook quantized differently on another CPU. float32
rounds as computed (its compiled kernels and torch's agree bit for bit; float32 runs are reproducible on
one machine).

The backward is a straight-through estimator: the gradient w.r.t. ``x`` passes where the rounded
value lies inside [qmin, qmax] (|x/s| <= 1 for the sign grid), and the gradient w.r.t. ``scale`` is
LSQ's (Esser et al. 2020), multiplied by ``grad_factor``. We write this as one autograd Function
rather than chaining differentiable ops because the chain would keep ~6 activation-sized temporaries
per quantizer alive for the backward; per-tensor, fixed-scale inputs use torch's fused kernel.
"""

from __future__ import annotations

import math

import torch

MAX_BITS = 16
MIN_SCALE = 1e-8  # an all-zero channel gets this scale: its codes and outputs are exactly 0, never NaN


def integer_range(bits: torch.Tensor | int, signed: bool, narrow: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(qmin, qmax) as float tensors for integer ``bits`` (0..16); ``narrow=False``: the full signed grid."""
    b = torch.as_tensor(bits, dtype=torch.float32)
    if signed:
        qmax = torch.where(b >= 2, torch.exp2(b - 1) - 1, torch.where(b == 1, 1.0, 0.0))
        if narrow:
            return -qmax, qmax
        return torch.where(b >= 2, -torch.exp2(b - 1), -qmax), qmax
    qmax = torch.where(b >= 1, torch.exp2(b) - 1, 0.0)
    return torch.zeros_like(qmax), qmax


def integer_range_int(bits: int, signed: bool, narrow: bool = True) -> tuple[int, int]:
    """:func:`integer_range` for one Python int (no tensors: used on the per-call hot path)."""
    if signed:
        top = 2 ** (bits - 1) - 1 if bits >= 2 else (1 if bits == 1 else 0)
        return (-top if narrow or bits < 2 else -top - 1), top
    return 0, (2 ** bits - 1 if bits >= 1 else 0)


def binary_mask(bits: torch.Tensor | int, signed: bool) -> torch.Tensor | None:
    """Where the 1-bit sign grid applies (signed, 1 bit), or None if nowhere."""
    if not signed:
        return None
    mask = torch.as_tensor(bits) == 1
    return mask if bool(mask.any()) else None


HALF_SNAP = 2.0 ** -36  # float64: relative distance from a half within which a value is the half


def round_to_level(v: torch.Tensor) -> torch.Tensor:
    """``torch.round`` (halves to even); in float64, values within ``HALF_SNAP`` of a half count as the half.

    The window is about 65,000 float64 ulps: wide enough for the last-bit differences between CPUs
    (measured up to ~100 ulps in trained weights), narrow enough that no value a scale does not put on
    a half in exact arithmetic lands in it in practice (torch has no such rounding mode, hence our own).
    """
    rounded = torch.round(v)
    if v.dtype != torch.float64:
        return rounded
    half = torch.floor(v) + 0.5
    return torch.where((v - half).abs() <= HALF_SNAP * v.abs(), torch.round(half), rounded)


def _quantize_codes(x: torch.Tensor, inv_scale: torch.Tensor, zero_point: torch.Tensor | None,
                    qmin: torch.Tensor, qmax: torch.Tensor, binary: torch.Tensor | None) -> torch.Tensor:
    """Integer codes (as floats) ``clamp(round(x / s) + z, qmin, qmax)``; sign codes where ``binary``."""
    rounded = round_to_level(x * inv_scale)
    if zero_point is not None:
        rounded = rounded + zero_point
    codes = torch.clamp(rounded, qmin, qmax)
    if binary is not None:
        codes = torch.where(binary, torch.where(x >= 0, 1.0, -1.0), codes)
    return codes


def _dequantize(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    return (codes - zero_point) * scale if zero_point is not None else codes * scale


def as_real(x: torch.Tensor) -> torch.Tensor:
    """``x`` as a float of at least single precision: float64 stays float64 (the `quick` profile computes
    in it), half and bfloat16 and integers become float32."""
    return x.to(torch.promote_types(x.dtype, torch.float32)) if x.is_floating_point() else x.float()


def safe_scale(scale: torch.Tensor) -> torch.Tensor:
    return scale.abs().clamp_min(MIN_SCALE)


def quantize_to_codes(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None,
                      qmin: torch.Tensor, qmax: torch.Tensor, binary: torch.Tensor | None = None) -> torch.Tensor:
    """The integer codes :func:`fake_quantize` would produce (for export and packing)."""
    scale = safe_scale(scale)
    return _quantize_codes(x, 1.0 / scale, zero_point, qmin, qmax, binary)


def dequantize_codes(codes: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None) -> torch.Tensor:
    """Inverse of :func:`quantize_to_codes`: bit-identical to the fake-quantized values."""
    return _dequantize(codes, safe_scale(scale), zero_point)


class _FakeQuantize(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, scale, zero_point, qmin, qmax, binary, grad_factor):
        safe = safe_scale(scale)
        inv_scale = 1.0 / safe
        codes = _quantize_codes(x, inv_scale, zero_point, qmin, qmax, binary)
        ctx.save_for_backward(x, safe, zero_point if zero_point is not None else torch.empty(0), qmin, qmax,
                              binary if binary is not None else torch.empty(0, dtype=torch.bool))
        ctx.has_zero_point = zero_point is not None
        ctx.grad_factor = grad_factor
        ctx.scale_shape = scale.shape
        return _dequantize(codes, safe, zero_point)

    @staticmethod
    def backward(ctx, grad_out):
        x, scale, zero_point, qmin, qmax, binary = ctx.saved_tensors
        zero_point = zero_point if ctx.has_zero_point else None
        binary = binary if binary.numel() else None
        scaled = x * (1.0 / scale)  # the forward's arithmetic: x / s can round a value near a half the other way
        rounded = round_to_level(scaled) + (zero_point if zero_point is not None else 0.0)
        inside = (rounded >= qmin) & (rounded <= qmax)
        if binary is not None:
            inside = torch.where(binary, scaled.abs() <= 1.0, inside)
        grad_x = grad_out * inside if ctx.needs_input_grad[0] else None
        grad_scale = None
        if ctx.needs_input_grad[1]:
            codes = torch.clamp(rounded, qmin, qmax)
            centred = codes - zero_point if zero_point is not None else codes
            local = torch.where(inside, centred - scaled, centred)
            if binary is not None:
                local = torch.where(binary, torch.where(x >= 0, 1.0, -1.0), local)
            grad_scale = (grad_out * local).sum_to_size(ctx.scale_shape) * ctx.grad_factor
        return grad_x, grad_scale, None, None, None, None, None


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor | None, qmin: torch.Tensor | int,
                  qmax: torch.Tensor | int, binary: torch.Tensor | None = None, grad_factor: float = 1.0) -> torch.Tensor:
    """Quantize-dequantize ``x``: ``(clamp(round(x / s) + z, qmin, qmax) - z) * s``.

    ``scale``, ``zero_point`` (None: symmetric), ``qmin``, ``qmax`` and ``binary`` broadcast against
    ``x``; their shapes decide the granularity. Differentiable w.r.t. ``x`` and ``scale`` (see module doc).
    """
    qmin_t = torch.as_tensor(qmin, dtype=x.dtype, device=x.device)
    qmax_t = torch.as_tensor(qmax, dtype=x.dtype, device=x.device)
    if not (torch.is_grad_enabled() and (x.requires_grad or scale.requires_grad)):
        return _fake_quantize_no_grad(x, safe_scale(scale), zero_point, qmin_t, qmax_t, binary)
    return _FakeQuantize.apply(x, scale, zero_point, qmin_t, qmax_t, binary, grad_factor)


def _fake_quantize_no_grad(x: torch.Tensor, safe: torch.Tensor, zero_point: torch.Tensor | None, qmin: torch.Tensor,
                           qmax: torch.Tensor, binary: torch.Tensor | None) -> torch.Tensor:
    """:func:`fake_quantize` without autograd, the same operations in place on one buffer.

    Searches call it on (candidates x activations)-sized tensors; every out-of-place step allocated (and
    page-faulted) another such tensor. Same arithmetic in the same order, so the results are identical
    (tested). Operands that would widen the buffer's shape or dtype take the out-of-place path.
    """
    out = x * (1.0 / safe)
    operands = [t for t in (zero_point, qmin, qmax, binary, safe) if t is not None]
    if any(torch.broadcast_shapes(out.shape, t.shape) != out.shape or
           (t.dtype != torch.bool and torch.result_type(out, t) != out.dtype) for t in operands):
        return _dequantize(_quantize_codes(x, 1.0 / safe, zero_point, qmin, qmax, binary), safe, zero_point)
    out = round_to_level(out) if out.dtype == torch.float64 else out.round_()
    if zero_point is not None:
        out.add_(zero_point)
    out.clamp_(qmin, qmax)
    if binary is not None:
        out = torch.where(binary, torch.where(x >= 0, 1.0, -1.0), out)
    if zero_point is not None:
        out.sub_(zero_point)
    return out.mul_(safe)


def fake_quantize_per_tensor(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    """Fixed-scale per-tensor case on torch's fused kernel (same arithmetic and STE as :func:`fake_quantize`).

    ``zero_point`` must be an int32 tensor of one element. float64 takes :func:`fake_quantize` (torch's
    kernel has no tolerant rounding of halves; see the module doc), with the same straight-through gradient.
    """
    if x.dtype == torch.float64:
        return fake_quantize(x, scale.detach(), zero_point.to(x.dtype).reshape(()), qmin, qmax)
    return torch.fake_quantize_per_tensor_affine(x, safe_scale(scale).reshape(1), zero_point.reshape(1), qmin, qmax)


def lsq_grad_factor(numel: int, qmax: float) -> float:
    """LSQ's gradient scale 1 / sqrt(N * Qp), which keeps step-size updates commensurate with weight updates."""
    return 1.0 / math.sqrt(max(1.0, numel * max(qmax, 1.0)))


def max_scale(absmax: torch.Tensor, bits: torch.Tensor | int, signed: bool, narrow: bool = True) -> torch.Tensor:
    """Scale that maps ``absmax`` to the largest code (symmetric grids); on the full signed grid to
    ``2^(b-1) - 0.5``, the middle of its two extreme magnitudes (PTQ4ViT's start)."""
    qmin, qmax = integer_range(bits, signed, narrow)
    if narrow or not signed:
        return absmax / qmax.clamp_min(1.0)
    return absmax / torch.where(qmin < -qmax, qmax + 0.5, qmax).clamp_min(1.0)


def asymmetric_params(minimum: torch.Tensor, maximum: torch.Tensor, bits: torch.Tensor | int) -> tuple[torch.Tensor, torch.Tensor]:
    """(scale, integer zero point) of the unsigned grid [0, 2^b - 1] covering [min(minimum, 0), max(maximum, 0)]."""
    _, qmax = integer_range(bits, signed=False)
    low, high = minimum.clamp_max(0.0), maximum.clamp_min(0.0)
    scale = ((high - low) / qmax.clamp_min(1.0)).clamp_min(MIN_SCALE)
    zero_point = torch.clamp(torch.round(-low / scale), torch.zeros_like(qmax), qmax)
    return scale, zero_point
