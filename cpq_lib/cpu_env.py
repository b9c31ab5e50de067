"""Environment variables that pin the CPU numerics libraries to fixed code paths on x86-64.

Each library picks its kernels by what the CPU offers (vector width, vendor, cache sizes), which
changes the order of floating-point sums and so the last bits of results; in float32 an Intel Xeon
and an AMD EPYC then train different networks from the same seed. The libraries read these variables once, at
their first use, so they must be set before anything imports them: this module needs nothing but
the standard library, and the notebook runner, the sweep driver and the test suite call
:func:`set_portable_environment` before their processes (or kernels) import torch or numpy.

What each pin does, and why that value:

- ``ATEN_CPU_CAPABILITY=avx2``: torch's own vectorised kernels compiled for AVX2 (every x86-64 server
  of the last decade has it): the same machine code on Intel and AMD.
- ``MKL_CBWR=COMPATIBLE``: MKL (torch's matrix products, and float64 convolutions through them) in
  its reproducible mode on the one branch that Intel's documentation says gives the same results on
  Intel and Intel-compatible (AMD) CPUs: the AVX2 and AVX-512 branches exist on Intel CPUs only, and
  elsewhere MKL silently takes its automatic branch (seen here: on an AMD EPYC every branch but
  COMPATIBLE gives the automatic one's bits). It costs: the `quick` digits CNN trains in 23.0 s instead
  of 10.5 s (about 17% of the whole `quick` run); without it an Intel and an AMD machine compute the
  same float64 `quick` results up to the last bits, and a figure's PDF can differ in one coordinate.
- ``ONEDNN_MAX_CPU_ISA=AVX2``: oneDNN (float32 convolutions; float64 never uses it).
- ``OPENBLAS_CORETYPE=Haswell``: the OpenBLAS inside numpy's and scipy's wheels (scikit-learn's
  mixtures and k-means), which otherwise picks SkylakeX, Zen or Haswell kernels by CPU.
- ``NPY_DISABLE_CPU_FEATURES``: numpy's own AVX-512 loops (exp and log, for one, round differently
  from its AVX2 ones); the names are those of numpy >= 2.4, whose lock this project ships.
"""

from __future__ import annotations

import getpass
import os
import platform
import tempfile
from importlib import metadata

PORTABLE_CPU_ENV = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "MKL_CBWR": "COMPATIBLE",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "OPENBLAS_CORETYPE": "Haswell",
}
NUMPY_AVX512_FEATURES = "X86_V4 AVX512_ICL AVX512_SPR"  # numpy >= 2.4's names for its AVX-512 dispatch targets
CUBLAS_DETERMINISTIC = {"CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


def _numpy_names_features() -> bool:
    """Whether the installed numpy knows the feature-group names above (2.4 and newer)."""
    try:
        major, minor = (int(part) for part in metadata.version("numpy").split(".")[:2])
    except (metadata.PackageNotFoundError, ValueError):
        return False
    return (major, minor) >= (2, 4)


def portable_cpu_environment() -> dict[str, str]:
    """The variables that pin CPU kernels to one code path (empty where they do not apply)."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return {}
    env = dict(PORTABLE_CPU_ENV)
    if _numpy_names_features():
        env["NPY_DISABLE_CPU_FEATURES"] = NUMPY_AVX512_FEATURES
    return env


def isolate_inductor_cache(environ: dict[str, str] | os._Environ | None = None) -> None:
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


def set_portable_environment(environ: dict[str, str] | os._Environ | None = None) -> None:
    """Set the pinning variables in ``environ`` (default ``os.environ``); values already set are kept,
    so a caller can choose another code path on purpose (the portability test does)."""
    target = os.environ if environ is None else environ
    for key, value in {**portable_cpu_environment(), **CUBLAS_DETERMINISTIC}.items():
        target.setdefault(key, value)
    isolate_inductor_cache(target)
