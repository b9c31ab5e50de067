"""Shared fixtures: the shared CIFAR-10 zip, and output folders kept out of the clone."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from cpq_lib.cpu_env import set_portable_environment

# the code paths the stored notebooks were executed with (cpq_lib.cpu_env), set before anything in this
# process imports torch or numpy; nbval's kernels and every subprocess inherit them
set_portable_environment()

REPO = Path(__file__).resolve().parent.parent
SHARED_ZIP = Path(os.environ.get("CPQ_SHARED_CIFAR10", REPO.parent / "shared" / "data" / "cifar10-jpeg.zip"))


def pytest_configure(config: pytest.Config) -> None:
    # nbval's kernels inherit this environment: notebook runs write their figures and records here,
    # not into the clone's figures/ and runs/ folders.
    scratch = Path(tempfile.mkdtemp(prefix="cpq-tests-"))
    os.environ.setdefault("CPQ_RUN_DIR", str(scratch / "runs"))
    os.environ.setdefault("CPQ_FIGURES_DIR", str(scratch / "figures"))
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("MPLBACKEND", "Agg")


@pytest.fixture(autouse=True)
def _restore_numerics():
    """Library calls configure the process (run_experiment, notebook.setup: float64 and one thread for
    `quick`); give every test the settings the session started with, whatever the one before it ran."""
    import torch

    dtype, threads = torch.get_default_dtype(), torch.get_num_threads()
    deterministic = torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_default_dtype(dtype)
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)


@pytest.fixture(scope="session")
def cifar10_zip() -> Path:
    """The shared JPEG CIFAR-10 zip; skipped when absent, a failure when CI=true (CI always has it)."""
    if not SHARED_ZIP.is_file():
        message = f"shared CIFAR-10 zip not found at {SHARED_ZIP}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message + " (CI=true: CI must have it)")
        pytest.skip(message)
    return SHARED_ZIP


@pytest.fixture(scope="session")
def cifar10(cifar10_zip):
    from cpq_lib.data import load_dataset

    return load_dataset("cifar10", cifar10_zip)


@pytest.fixture(scope="session")
def digits():
    from cpq_lib.data import load_dataset

    return load_dataset("digits")


@pytest.fixture()
def tmp_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "cache"
    monkeypatch.setenv("CPQ_CACHE_DIR", str(cache))
    return cache


@pytest.fixture(scope="session")
def digits_baseline(tmp_path_factory, digits):
    """The quick profile's trained digits_cnn (trained once per test session) and its model card."""
    from cpq_lib.config import make_config
    from cpq_lib.pipeline import baseline_model

    return baseline_model(make_config("quick"), digits, tmp_path_factory.mktemp("baseline-run"), progress=False)


@pytest.fixture(scope="session")
def quick_baseline_dir(tmp_path_factory) -> Path:
    """A ``baseline`` folder as the quick profile trains it (one thread, pinned kernels), to copy into the
    run folders of subprocess tests so that they do not train again."""
    import torch

    from cpq_lib.config import make_config
    from cpq_lib.pipeline import baseline_model, load_data
    from cpq_lib.runtime import configure_for

    threads, dtype = torch.get_num_threads(), torch.get_default_dtype()
    config = make_config("quick")
    configure_for(config)
    run = tmp_path_factory.mktemp("quick-run")
    try:
        baseline_model(config, load_data(config), run, progress=False)
    finally:  # give the rest of the session its threads and kernels back
        torch.set_num_threads(threads)
        torch.use_deterministic_algorithms(False)
        torch.set_default_dtype(dtype)
    return run / "baseline"  # holds seed-0/
