"""Reproducible numerics: seeds, a fixed thread count, deterministic kernels and a fixed CPU instruction set.

Same seed, same code, same machine kind must give the same numbers bit for bit. Seeds alone do not
do that on a CPU: the thread count changes how reductions are split, and torch, oneDNN and MKL pick
kernels by instruction set (AVX2, AVX-512, AMX), which changes the order of floating-point sums.
Measured on the `quick` profile's digits CNN (30 epochs): 1, 2 and 4 threads train three different
networks, and so do AVX-512 and AVX2 kernels on the same machine. ``deterministic=True`` therefore
also caps every CPU library at AVX2, which all x86-64 servers of the last decade have, so machines of
the same kind with different vector units agree. The caps are environment variables that each
library reads once, at its first use: :func:`configure_runtime` sets them if nothing has computed yet,
and the notebook runner and the test suite set them for the processes they start.
"""

from __future__ import annotations

import getpass
import os
import platform
import random
import tempfile
import warnings
from typing import Any

import numpy as np
import torch

# torch's own vectorised kernels (and torch.compile's C++ code), oneDNN convolutions, MKL matrix products
PORTABLE_CPU_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_CBWR": "AVX2"}
CUBLAS_DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def portable_cpu_environment() -> dict[str, str]:
    """The environment that pins CPU kernels to one instruction set (empty where it does not apply)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    return dict(PORTABLE_CPU_ENV)


def isolate_inductor_cache(environ: dict[str, str] | None = None) -> None:
    """Give torch.compile a cache folder of its own per pinned instruction set.

    torch 2.14's inductor cache does not key its compiled CPU kernels by ``ATEN_CPU_CAPABILITY``: a
    kernel compiled for AVX-512 and reloaded in an AVX2-pinned process (or the reverse) returned NaN
    or crashed with "double free" here. Separate folders keep the two apart. A folder the user chose
    (``TORCHINDUCTOR_CACHE_DIR``) is left alone.
    """
    target = os.environ if environ is None else environ
    capability = target.get("ATEN_CPU_CAPABILITY")
    if capability and "TORCHINDUCTOR_CACHE_DIR" not in target:
        try:
            user = getpass.getuser()
        except (KeyError, OSError):
            user = "user"
        safe = "".join(c if c.isalnum() else "_" for c in f"{user}_{capability}")
        target["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(tempfile.gettempdir(), f"torchinductor_{safe}")


def set_portable_environment(environ: dict[str, str] | None = None) -> None:
    """Set the portable-kernel variables in ``environ`` (default ``os.environ``) unless already set."""
    target = os.environ if environ is None else environ
    for key, value in {**portable_cpu_environment(), **CUBLAS_DETERMINISTIC}.items():
        target.setdefault(key, value)
    isolate_inductor_cache(target)


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_runtime(seed: int, threads: int | None = None, deterministic: bool = False) -> dict[str, Any]:
    """Seed everything, fix the thread count and, if ``deterministic``, pin kernels; returns what was set."""
    if deterministic:
        set_portable_environment()
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        wanted = portable_cpu_environment().get("ATEN_CPU_CAPABILITY")
        actual = torch.backends.cpu.get_cpu_capability()
        if wanted and actual.lower() != wanted:
            warnings.warn(
                f"cpq: CPU kernels use {actual}, not {wanted.upper()}: torch computed before the runtime was configured "
                f"(or the CPU lacks AVX2); numbers may differ from runs on other machines of this kind. "
                f"Start the process with {' '.join(f'{k}={v}' for k, v in PORTABLE_CPU_ENV.items())}",
                stacklevel=2,
            )
    if threads is not None:
        torch.set_num_threads(threads)
    seed_everything(seed)
    return runtime_record(deterministic)


def runtime_record(deterministic: bool | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    if deterministic is not None:
        record["deterministic"] = deterministic
    return record
