"""What every result record carries, so a number can be traced to its code, settings and machine."""

from __future__ import annotations

import datetime as _dt
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


def environment_record() -> dict[str, Any]:
    return {
        "cpq_version": __version__, "git_commit": git_commit(), "torch_version": str(torch.__version__),
        "torch_threads": torch.get_num_threads(), "python": platform.python_version(), "machine": platform.machine(),
    }


def run_record(config: Any, results: dict[str, Any] | None = None) -> dict[str, Any]:
    """A result record: configuration (with its seed), environment, time, results."""
    as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
    return {"config": as_dict, "seed": as_dict.get("seed"), "environment": environment_record(),
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"), "results": results or {}}
