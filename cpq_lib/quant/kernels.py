"""Fused one-pass kernels for hot, memory-bound element-wise work, compiled on first use.

Two places spend most of their time in element-wise passes over activation-sized tensors:
- inference-time activation fake-quantization: torch's fused ``fake_quantize_per_tensor_affine``
  also builds a gradient mask and on CPU costs about five batch-norm passes per call (measured:
  9.4 ms vs 1.75 ms on 256x16x32x32); the compiled ``(clamp(round(x / s) + z, lo, hi) - z) * s`` is
  one loop (2.0 ms), with the same arithmetic, so results are bit-identical;
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


def _taylor_max(a, g):
    return torch.amax(torch.abs(a * g), dim=tuple(range(2, a.dim())))


def _mean_abs(x):
    return torch.mean(torch.abs(x), dim=tuple(range(2, x.dim())))


def _taylor_active(a, g, eps):
    return (torch.abs(a * g) > eps).to(torch.float32)


FAKE_QUANTIZE = FusedKernel(_fake_quantize)
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
