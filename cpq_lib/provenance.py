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


def environment_record() -> dict[str, Any]:
    return {
        "cpq_version": __version__, "git_commit": git_commit(), "torch_version": str(torch.__version__),
        "torch_threads": torch.get_num_threads(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "python": platform.python_version(), "machine": platform.machine(),
    }


def run_record(config: Any, results: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result record: configuration (with its seed), environment, time, results."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {"config": as_dict, "seed": as_dict.get("seed"), "environment": environment_record(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "results": results or {}}
