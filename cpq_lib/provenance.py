"""What every result record carries, so a number can be traced to its code, settings and machine."""

from __future__ import annotations

import datetime as _dt
import hashlib
import platform
import subprocess
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .lock import installed_versions, lock_status


def git_commit(folder: Path | None = None) -> str | None:
    """The commit of the checkout holding this package (with ``+dirty`` if it has local changes)."""
    folder = folder or Path(__file__).resolve().parent
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=folder, capture_output=True, text=True, timeout=10)
        if commit.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=folder,
                               capture_output=True, text=True, timeout=10)
        return commit.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


PACKAGE = Path(__file__).resolve().parent


def code_fingerprint(*parts: str) -> str:
    """Hash of the package sources that produce a cached result (modules or subpackages, e.g. "train").

    Caches keyed by it (trained baselines, class scores) are recomputed after the code that made them
    changes, so a result never depends on what an earlier version left in a run folder.
    """
    digest = hashlib.sha256(__version__.encode())
    for part in sorted(parts):
        base = PACKAGE / part
        files = sorted(base.rglob("*.py")) if base.is_dir() else [base.with_suffix(".py")]
        if not files or not all(f.is_file() for f in files):
            raise ValueError(f"code_fingerprint: no source for {part!r} under {PACKAGE}")
        for path in files:
            digest.update(path.relative_to(PACKAGE).as_posix().encode())
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


KEY_PACKAGES = ("torch", "numpy", "scipy", "scikit-learn", "pandas", "matplotlib")  # what the numbers and figures depend on most


def environment_record() -> dict[str, Any]:
    """Code, interpreter, CPU code path, and every installed package with its version (and whether they
    are the locked ones), so a number can be remade with exactly the environment that made it."""
    packages = installed_versions()
    return {
        "cpq_version": __version__, "git_commit": git_commit(), "torch_version": str(torch.__version__),
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "dtype": str(torch.get_default_dtype()).removeprefix("torch."),
        "python": platform.python_version(), "machine": platform.machine(), "processor": cpu_model(),
        "packages": packages, "lock": lock_status(packages),
    }


def cpu_model() -> str:
    """The CPU's model name (Linux), e.g. to tell an Intel Xeon from an AMD EPYC run."""
    try:
        for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def package_summary(packages: dict[str, str] | None = None) -> str:
    """One line: the key packages' versions, how many are installed, and whether they match the lock."""
    packages = installed_versions() if packages is None else packages
    key = ", ".join(f"{name} {packages[name]}" for name in KEY_PACKAGES if name in packages)
    return f"python {platform.python_version()}, {key}; {len(packages)} packages, {lock_status(packages)}"


def run_record(config: Any, results: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result record: configuration (with its seed), environment, time, results."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {"config": as_dict, "seed": as_dict.get("seed"), "environment": environment_record(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "results": results or {}}
