"""Fused one-pass kernels for hot, memory-bound element-wise work, compiled on first use.

Two places spend most of their time in element-wise passes over activation-sized tensors:
- activation fake-quantization: torch's fused ``fake_quantize_per_tensor_affine`` also builds a
  gradient mask and on CPU costs about five batch-norm passes per call (measured: 9.4 ms vs 1.75 ms
  on 256x16x32x32); the compiled ``(clamp(round(x / s) + z, lo, hi) - z) * s`` is one loop (2.0 ms),
  with the same arithmetic, so results are bit-identical. Training needs the straight-through mask
  too: the backward is one compiled loop that recomputes the mask from the input (torch's cachemask
  kernel and its backward were 30% of a quantized ResNet-20 train step on the CPU);
- class scoring's ``max over positions of |a * g|``: eager ``mul`` + ``vector_norm`` over the strided
  spatial axes of channels_last tensors costs 8.9 ms on 250x16x32x32; fused, 0.8 ms; and its
  per-position indicator ``[|a * g| > eps]`` (four eager passes, one fused).

``torch.compile`` (inductor) compiles once per (rank, memory format) on first use, which takes
seconds and needs a C++ compiler. ``CPQ_COMPILE=0`` switches it off; any compile failure falls back
to the eager version with a warning.
"""

from __future__ import annotations

import logging
import os
import warnings
from typing import Callable

import torch

from ..runtime import isolate_inductor_cache
from .primitives import safe_scale

_disabled = False


def compiled_kernels_enabled() -> bool:
    return not _disabled and os.environ.get("CPQ_COMPILE", "1").lower() not in ("0", "false", "no", "off")


def disable_compiled_kernels(reason: str | None = None) -> None:
    global _disabled
    _disabled = True
    if reason:
        warnings.warn(f"cpq: compiled kernels unavailable ({reason}); using eager torch kernels", stacklevel=3)


def _import_cpp_extension_quietly() -> None:
    """Inductor imports ``torch.utils.cpp_extension``, which logs a CUDA_HOME warning on CPU-only
    machines with CUDA wheels; the warning is irrelevant to CPU kernels and would land in notebooks."""
    logger = logging.getLogger("torch.utils.cpp_extension")
    previous = logger.level
    logger.setLevel(logging.ERROR)
    try:
        import torch.utils.cpp_extension  # noqa: F401
    finally:
        logger.setLevel(previous)


class FusedKernel:
    """``fn`` compiled on first call (dynamic shapes); ``fallback`` (default ``fn``) when compiling is off or fails."""

    def __init__(self, fn: Callable[..., torch.Tensor]) -> None:
        self.fn = fn
        self.compiled: Callable[..., torch.Tensor] | None = None
        self.calls = {"compiled": 0, "eager": 0}  # which path ran (tests and benchmarks check it)

    def __call__(self, *args: torch.Tensor, fallback: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if torch.compiler.is_compiling():  # inside a graph being compiled: inductor fuses the plain function
            return self.fn(*args)
        if compiled_kernels_enabled():
            if self.compiled is None:
                _import_cpp_extension_quietly()
                isolate_inductor_cache()  # compiled kernels of another instruction set must not be reused
                self.compiled = torch.compile(self.fn, dynamic=True)
            try:
                out = self.compiled(*args)
                self.calls["compiled"] += 1
                return out
            except Exception as exc:  # no compiler, unsupported platform, ...: keep working
                disable_compiled_kernels(f"{type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}")
        self.calls["eager"] += 1
        return fallback() if fallback is not None else self.fn(*args)


def _fake_quantize(x, inv_scale, scale, zero_point, qmin, qmax):
    return (torch.clamp(torch.round(x * inv_scale) + zero_point, qmin, qmax) - zero_point) * scale


def _straight_through_gradient(grad, x, inv_scale, zero_point, qmin, qmax):
    codes = torch.round(x * inv_scale) + zero_point
    return grad * ((codes >= qmin) & (codes <= qmax)).to(grad.dtype)


def _fake_quantize_symmetric(x, inv_scale, scale, qmin, qmax):
    return torch.clamp(torch.round(x * inv_scale), qmin, qmax) * scale


def _lsq_gradients(grad, x, scale, qmin, qmax):
    """LSQ's backward for a symmetric per-tensor quantizer, element-wise: the input's gradient and each
    element's share of the step size's (summed by the caller, in torch's order)."""
    scaled = x * (1.0 / scale)  # as the forward and the generic backward scale
    rounded = torch.round(scaled) + 0.0  # as the generic backward: -0.0 codes become +0.0
    inside = (rounded >= qmin) & (rounded <= qmax)
    codes = torch.clamp(rounded, qmin, qmax)
    return grad * inside.to(grad.dtype), grad * torch.where(inside, codes - scaled, codes)


def _taylor_max(a, g):
    return torch.amax(torch.abs(a * g), dim=tuple(range(2, a.dim())))


def _mean_abs(x):
    return torch.mean(torch.abs(x), dim=tuple(range(2, x.dim())))


def _taylor_active(a, g, eps):
    return (torch.abs(a * g) > eps).to(torch.float32)


FAKE_QUANTIZE = FusedKernel(_fake_quantize)
STRAIGHT_THROUGH_GRADIENT = FusedKernel(_straight_through_gradient)
FAKE_QUANTIZE_SYMMETRIC = FusedKernel(_fake_quantize_symmetric)
LSQ_GRADIENTS = FusedKernel(_lsq_gradients)
TAYLOR_MAX = FusedKernel(_taylor_max)
MEAN_ABS = FusedKernel(_mean_abs)
TAYLOR_ACTIVE = FusedKernel(_taylor_active)


def inference_arguments(scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> tuple[torch.Tensor, ...]:
    """The kernel's scalar arguments (1/s, s, z, lo, hi) as 0-d float tensors; callers may cache them."""
    scale32 = scale.detach().reshape(()).to(torch.float32)
    return (1.0 / scale32, scale32, zero_point.detach().reshape(()).to(torch.float32),
            torch.tensor(float(qmin)), torch.tensor(float(qmax)))


def fake_quantize_inference(x: torch.Tensor, arguments: tuple[torch.Tensor, ...],
                            fallback: Callable[[], torch.Tensor]) -> torch.Tensor:
    """One-pass fake quantization of ``x`` (no autograd); ``fallback()`` computes the same with torch's kernel."""
    if x.dtype != torch.float32:
        return fallback()
    return FAKE_QUANTIZE(x, *arguments, fallback=fallback)


class _FakeQuantizeTraining(torch.autograd.Function):
    """Fixed-scale per-tensor fake quantization with the straight-through estimator, on fused kernels:
    the same values and gradient as ``fake_quantize_per_tensor_affine`` (x's gradient passes where the
    rounded code lies in [qmin, qmax]). The backward recomputes the mask from ``x`` instead of storing
    it: storing a bool mask is a scalar loop in inductor's CPU code (12 ms vs 1.2 ms for the whole
    forward on 256x16x32x32), and ``x`` is what the float layer would have saved anyway."""

    @staticmethod
    def forward(ctx, x, inv_scale, scale, zero_point, qmin, qmax):
        ctx.save_for_backward(x, inv_scale, zero_point, qmin, qmax)
        return FAKE_QUANTIZE(x, inv_scale, scale, zero_point, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, inv_scale, zero_point, qmin, qmax = ctx.saved_tensors
        return STRAIGHT_THROUGH_GRADIENT(grad, x, inv_scale, zero_point, qmin, qmax), None, None, None, None, None


def fake_quantize_training(x: torch.Tensor, arguments: tuple[torch.Tensor, ...],
                           fallback: Callable[[], torch.Tensor]) -> torch.Tensor:
    """Fixed-scale fake quantization of ``x`` that ``x``'s gradient flows through (straight-through).

    ``fallback()`` (torch's fused kernel) runs for other dtypes, when compiled kernels are off, and
    inside a ``torch.compile`` graph (where inductor fuses torch's operator itself).
    """
    if x.dtype != torch.float32 or not compiled_kernels_enabled() or torch.compiler.is_compiling():
        return fallback()
    return _FakeQuantizeTraining.apply(x, *arguments)


class _LearnedStepSymmetric(torch.autograd.Function):
    """Symmetric per-tensor fake quantization with a learnable step size (LSQ), on fused kernels: the
    same values and gradients as :func:`cpq_lib.quant.primitives.fake_quantize` with a 0-d scale and no
    zero point (the same element-wise arithmetic; the step size's gradient summed by torch as there).
    The generic version's eager chain makes about twelve passes over the activation per call."""

    @staticmethod
    def forward(ctx, x, scale, qmin, qmax, grad_factor):
        safe = safe_scale(scale)
        ctx.save_for_backward(x, safe, qmin, qmax)
        ctx.grad_factor = grad_factor
        return FAKE_QUANTIZE_SYMMETRIC(x, 1.0 / safe, safe, qmin, qmax)

    @staticmethod
    def backward(ctx, grad):
        x, scale, qmin, qmax = ctx.saved_tensors
        grad_x, shares = LSQ_GRADIENTS(grad, x, scale, qmin, qmax)
        grad_scale = shares.sum_to_size(scale.shape) * ctx.grad_factor if ctx.needs_input_grad[1] else None
        return (grad_x if ctx.needs_input_grad[0] else None), grad_scale, None, None, None


def learned_step_training(x: torch.Tensor, scale: torch.Tensor, qmin: int, qmax: int, grad_factor: float,
                          fallback: Callable[[], torch.Tensor]) -> torch.Tensor:
    """LSQ fake quantization of ``x`` with a learnable 0-d ``scale`` (its absolute value, at least
    MIN_SCALE, is the step); ``fallback()`` (the generic autograd function) where the fused path does not apply."""
    if (x.dtype != torch.float32 or scale.dtype != torch.float32 or scale.dim() != 0 or not compiled_kernels_enabled()
            or torch.compiler.is_compiling()):
        return fallback()
    return _LearnedStepSymmetric.apply(x, scale, torch.tensor(float(qmin)), torch.tensor(float(qmax)), grad_factor)


def taylor_max(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """(B, C): max over positions of |a * g| for (B, C, ...) tensors (|a * g| itself for (B, C))."""
    return (a * g).abs() if a.dim() == 2 else TAYLOR_MAX(a, g)


def taylor_active(a: torch.Tensor, g: torch.Tensor, eps: float) -> torch.Tensor:
    """``[|a * g| > eps]`` as float32 0/1 in one pass, keeping ``a``'s memory format."""
    if a.dtype != torch.float32 or g.dtype != torch.float32:
        return ((a * g).abs() > eps).to(torch.float32)
    return TAYLOR_ACTIVE(a, g, torch.tensor(float(eps)))


def mean_abs(x: torch.Tensor) -> torch.Tensor:
    """(B, C): mean over positions of |x|."""
    return x.abs() if x.dim() == 2 else MEAN_ABS(x)
