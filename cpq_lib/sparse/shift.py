"""Shift-and-add convolution from focused-quantization codes: the multiplications focused levels save.

A focused weight is ``alpha * (sigma_c * s * 2^e + mu_c)`` (s in {-1, +1}; the zero level s = 0 adds
only ``mu_c``). For integer inputs ``x`` (activation codes with step ``s_x``) an output is

    y = s_x * alpha * sum_c [ sigma_c * 2^e_min * A_c + mu_c * B_c ],
    A_c = sum_{k in c, s_k != 0} s_k * (x_k << (e_k - e_min)),   B_c = sum_{k in c} x_k,

so the inner loop is integer shifts, negations and additions; each output needs only two
multiplications per component afterwards. :func:`shift_add_conv2d` computes exactly that with integer
tensors (``A_c`` and ``B_c`` are exact), which the tests compare with the float convolution of the
fake-quantized weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .focused import FocusedLayout, split_codes


def integer_sums(x_int: torch.Tensor, codes: torch.Tensor, layout: FocusedLayout, stride=1, padding=0, dilation=1,
                 groups: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """(A, B) per component: int64 tensors (components, N, out, H', W') from shifts and adds only.

    ``groups`` as in Conv2d: output channels of group g read only the input channels of group g.
    """
    if x_int.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"inputs must be an integer tensor (activation codes), got {x_int.dtype}")
    out_channels, per_group, kh, kw = codes.shape
    if x_int.shape[1] != per_group * groups or out_channels % groups:
        raise ValueError(f"codes {tuple(codes.shape)} with groups={groups} do not fit an input of {x_int.shape[1]} channels")
    # (N, K, L) small integers held in float64: sums of up to K of them stay below 2^53, so the additions
    # below (0/1-selected inputs summed by a BLAS product, far faster than int64 loops) are exact; the
    # sums are converted to int64 before any shift
    if x_int.numel() and float(x_int.abs().max()) * per_group * kh * kw >= 2 ** 53:
        raise ValueError("inputs too large for exact sums (|x| * inputs per output must stay below 2^53)")
    columns = F.unfold(x_int.double(), (kh, kw), dilation, padding, stride)
    n, _, length = columns.shape
    columns = columns.view(n, groups, per_group * kh * kw, length)
    flat = codes.reshape(groups, out_channels // groups, -1)    # (G, out per group, K per group)
    e = layout.exponents
    valid = flat >= 0
    component, negative, shift, zero = split_codes(flat, layout)

    def selected_sum(chosen: torch.Tensor) -> torch.Tensor:  # additions of the selected inputs -> (N, out, L)
        total = torch.einsum("ngkl,gok->ngol", columns, chosen.double()).reshape(n, out_channels, length)
        return total.round().long()

    sums_a, sums_b = [], []
    for c in range(len(layout.centres)):
        in_c = valid & (component == c)                        # zero levels included: they count in B only
        shifted = in_c & ~zero
        a = torch.zeros(n, out_channels, length, dtype=torch.long)
        for t in range(e):                                     # one pass per shift amount (E of them)
            for sign, chosen in ((1, shifted & (shift == t) & ~negative), (-1, shifted & (shift == t) & negative)):
                if bool(chosen.any()):
                    a += sign * torch.bitwise_left_shift(selected_sum(chosen), t)
        sums_a.append(a)
        sums_b.append(selected_sum(in_c))
    height = (x_int.shape[2] + 2 * _pair(padding)[0] - _pair(dilation)[0] * (kh - 1) - 1) // _pair(stride)[0] + 1
    width = (x_int.shape[3] + 2 * _pair(padding)[1] - _pair(dilation)[1] * (kw - 1) - 1) // _pair(stride)[1] + 1
    shape = (n, out_channels, height, width)
    return torch.stack([a.view(shape) for a in sums_a]), torch.stack([b.view(shape) for b in sums_b])


def shift_add_conv2d(x_int: torch.Tensor, input_step: float, codes: torch.Tensor, layout: FocusedLayout, alpha: float,
                     stride=1, padding=0, dilation=1, groups: int = 1) -> torch.Tensor:
    """The convolution of ``x_int * input_step`` with the focused weights, via integer shift-and-add sums."""
    a, b = integer_sums(x_int, codes, layout, stride, padding, dilation, groups)
    total = torch.zeros(a.shape[1:], dtype=torch.float64)
    for c, (centre, spread) in enumerate(zip(layout.centres, layout.spreads)):
        total += spread * 2.0 ** layout.e_min * a[c].double() + centre * b[c].double()
    return input_step * alpha * total


def shift_add_linear(x_int: torch.Tensor, input_step: float, codes: torch.Tensor, layout: FocusedLayout, alpha: float) -> torch.Tensor:
    """A Linear layer (codes (out, in)) on integer inputs (N, in), as a 1 x 1 shift-and-add convolution."""
    out = shift_add_conv2d(x_int[:, :, None, None], input_step, codes[:, :, None, None], layout, alpha)
    return out[:, :, 0, 0]


def _pair(value) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else tuple(value)
