"""Runtime numerics: default precision, thread counts, pinned CPU code paths, and what records say of them."""

import os
import subprocess
import sys

import pytest
import torch

from cpq_lib.config import make_config
from cpq_lib.cpu_env import PORTABLE_CPU_ENV, portable_cpu_environment, set_portable_environment
from cpq_lib.runtime import configure_for, configure_runtime


def test_configure_for_quick_computes_in_float64_on_one_thread():
    record = configure_for(make_config("quick"))
    assert torch.get_default_dtype() == torch.float64 and torch.get_num_threads() == 1
    assert record["dtype"] == "float64" and record["deterministic"] is True
    assert torch.nn.Conv2d(1, 2, 3).weight.dtype == torch.float64  # models built afterwards follow
    assert set(record["pinned"]) == set(portable_cpu_environment())
    configure_for(make_config("cifar10"))
    assert torch.get_default_dtype() == torch.float32


def test_unknown_dtype_is_refused_before_anything_changes():
    before = torch.get_default_dtype()
    with pytest.raises(ValueError, match=r"dtype 'float16' is not allowed; choose one of \['float32', 'float64'\]"):
        configure_runtime(0, dtype="float16")
    assert torch.get_default_dtype() == before


def test_pins_keep_values_a_caller_chose():
    environ = {"MKL_CBWR": "COMPATIBLE"}
    set_portable_environment(environ)
    assert environ["MKL_CBWR"] == "COMPATIBLE"  # kept: the portability test chooses other code paths on purpose
    assert environ["ATEN_CPU_CAPABILITY"] == PORTABLE_CPU_ENV["ATEN_CPU_CAPABILITY"]
    assert environ["OPENBLAS_CORETYPE"] == "Haswell" and "X86_V4" in environ["NPY_DISABLE_CPU_FEATURES"]
    assert environ["TORCHINDUCTOR_CACHE_DIR"].endswith("_avx2")


PROBE = """
import numpy, torch
from threadpoolctl import threadpool_info
from numpy._core._multiarray_umath import __cpu_features__ as features
print(torch.backends.cpu.get_cpu_capability(), features.get("X86_V4", False) or features.get("AVX512_ICL", False),
      sorted({i.get("architecture") for i in threadpool_info() if i.get("internal_api") == "openblas"}))
"""


@pytest.mark.skipif(os.uname().machine != "x86_64", reason="the pins are for x86-64 CPUs")
def test_the_pins_reach_torch_numpy_and_openblas():
    """Each pinned library really takes the pinned path in a fresh process (not merely an env var set)."""
    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU_ENV and k != "NPY_DISABLE_CPU_FEATURES"}
    set_portable_environment(env)
    pinned = subprocess.run([sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, check=True).stdout
    assert pinned.split()[0] == "AVX2"
    assert pinned.split()[1] == "False"  # numpy's AVX-512 loops off
    assert "['Haswell']" in pinned


def test_cpq_threads_replaces_the_configured_count(monkeypatch):
    monkeypatch.setenv("CPQ_THREADS", "2")
    assert configure_for(make_config("quick"))["threads"] == 2
    monkeypatch.setenv("CPQ_THREADS", "two")
    with pytest.raises(ValueError, match=r"CPQ_THREADS='two': expected a whole number of threads >= 1"):
        configure_for(make_config("quick"))
