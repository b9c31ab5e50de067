"""Reproducible numerics: seeds, thread counts, deterministic kernels, pinned CPU code paths, precision.

Same seed, same code, same machine: same numbers bit for bit. Seeds alone do not do that on a CPU:
the thread count changes how reductions are split, and torch, MKL, oneDNN, OpenBLAS and numpy pick
kernels by what the CPU offers, which changes the order of floating-point sums. ``deterministic=True``
pins all of them to code paths that every x86-64 CPU with AVX2 runs alike (:mod:`cpq_lib.cpu_env`).

Pinning alone is fragile: a library version or a CPU that handles a pin differently brings back a
last-bit difference, and a training run of float32 SGD turns one into a different network
(measured on the `quick` digits CNN, 30 epochs: every kernel setting tried gave another network,
the validation accuracy moved by 0.7 points and the test accuracy by 0.6). In float64 the same
variations change the final training loss in its 15th significant digit and no accuracy, plan or path. The
`quick` profile therefore computes in float64 (``dtype``): its results hold under any kernel choice,
and with the pins they are also bit-identical. ``cifar10`` and ``paper`` keep float32.

The pins are environment variables that each library reads once: :func:`configure_runtime` sets them
if nothing has computed yet (and warns if torch already chose other kernels); the notebook runner, the
sweep driver and the test suite set them for the processes they start.
"""

from __future__ import annotations

import os
import random
import warnings
from typing import Any

import numpy as np
import torch

from .cpu_env import (CUBLAS_DETERMINISTIC, PORTABLE_CPU_ENV, isolate_inductor_cache, portable_cpu_environment,
                      set_portable_environment)

__all__ = ["CUBLAS_DETERMINISTIC", "DTYPES", "PORTABLE_CPU_ENV", "configure_for", "configure_runtime",
           "isolate_inductor_cache", "portable_cpu_environment", "runtime_record", "seed_everything",
           "set_portable_environment"]

DTYPES = {"float32": torch.float32, "float64": torch.float64}


def seed_everything(seed: int) -> None:
    """Python's, NumPy's and torch's (CPU and CUDA) global generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def configure_runtime(seed: int, threads: int | None = None, deterministic: bool = False,
                      dtype: str = "float32") -> dict[str, Any]:
    """Seed everything, fix thread counts, set the default float ``dtype`` and, if ``deterministic``, pin
    kernels; returns what was set (for records)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not allowed; choose one of {sorted(DTYPES)}")
    if deterministic:
        set_portable_environment()
        torch.use_deterministic_algorithms(True, warn_only=True)
        torch.backends.cudnn.benchmark = False
        wanted = os.environ.get("ATEN_CPU_CAPABILITY")
        actual = torch.backends.cpu.get_cpu_capability()
        if wanted and actual.lower() != wanted.lower():
            warnings.warn(
                f"cpq: CPU kernels use {actual}, not {wanted.upper()}: torch computed before the runtime was configured "
                f"(or the CPU lacks {wanted.upper()}); the last bits of results may differ from other machines' (the "
                f"float64 `quick` results do not). Start the process with "
                f"{' '.join(f'{k}={v}' for k, v in portable_cpu_environment().items())}",
                stacklevel=2,
            )
    if threads is not None:
        torch.set_num_threads(threads)
        _limit_native_pools(threads)
    torch.set_default_dtype(DTYPES[dtype])
    seed_everything(seed)
    return runtime_record(deterministic)


THREADS_ENV = "CPQ_THREADS"


def configure_for(config: Any) -> dict[str, Any]:
    """:func:`configure_runtime` with an :class:`~cpq_lib.config.ExperimentConfig`'s settings.

    ``CPQ_THREADS=N`` in the environment replaces the configuration's thread count (e.g. more cores for
    `quick`, whose checked outputs do not depend on it; the record says which count ran).
    """
    threads = config.threads
    override = os.environ.get(THREADS_ENV)
    if override is not None:
        if not override.isdigit() or int(override) < 1:
            raise ValueError(f"{THREADS_ENV}={override!r}: expected a whole number of threads >= 1")
        threads = int(override)
    return configure_runtime(config.seed, threads, config.deterministic, config.dtype)


def _limit_native_pools(threads: int) -> None:
    """numpy's and scipy's OpenBLAS and scikit-learn's OpenMP loops use ``threads`` too (threadpoolctl)."""
    from threadpoolctl import threadpool_limits

    threadpool_limits(limits=threads)


def runtime_record(deterministic: bool | None = None) -> dict[str, Any]:
    record: dict[str, Any] = {"threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                              "dtype": str(torch.get_default_dtype()).removeprefix("torch.")}
    if deterministic is not None:
        record["deterministic"] = deterministic
        if deterministic:
            record["pinned"] = {key: os.environ.get(key) for key in portable_cpu_environment()}
    return record
