"""Notebook context: turns a notebook's parameters into config, data, folders and result records.

Notebooks stay thin: they call ``setup(...)`` once, then library functions, tables and plots.
Folder defaults are relative to the notebook (``../runs/<profile>``, ``../figures/<profile>``) and can
be redirected with ``CPQ_RUN_DIR`` / ``CPQ_FIGURES_DIR`` (tests use this to keep the clone clean).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from .config import ExperimentConfig, make_config
from .data import DataBundle
from .fileio import atomic_write_json
from .pipeline import load_data
from .plots import save_figure, set_style
from .provenance import package_summary, run_record
from .runtime import configure_for

RUN_DIR_ENV = "CPQ_RUN_DIR"
FIGURES_DIR_ENV = "CPQ_FIGURES_DIR"


@dataclass
class NotebookContext:
    config: ExperimentConfig
    data: DataBundle
    run_dir: Path
    figures_dir: Path
    runtime: dict[str, Any]

    @property
    def device(self) -> str:
        return self.config.resolved_device()

    def save_figure(self, fig: plt.Figure, name: str) -> None:
        """Save under the profile's figure folder (PNG and PDF); the figure still displays inline."""
        save_figure(fig, self.figures_dir, name)

    def record(self, stage: str, results: dict[str, Any]) -> dict[str, Any]:
        """Write ``run_dir/<stage>.json``: results with configuration, seed and environment."""
        record = run_record(self.config, results)
        atomic_write_json(json.loads(json.dumps(record, default=str)), self.run_dir / f"{stage}.json")
        return record

    def summary(self) -> str:
        """Configuration, numerics and package versions (the first line a notebook prints)."""
        c = self.config
        return (f"profile={c.profile} seed={c.seed} device={self.device} data={c.data.name} "
                f"model={c.model.name}{' (pretrained)' if c.model.pretrained else ''} "
                f"threads={self.runtime['threads']} cpu={self.runtime['cpu_capability']} dtype={self.runtime['dtype']}\n"
                f"{package_summary()}")


def _folder(explicit: str | None, env: str, default: str) -> Path:
    chosen = explicit or os.environ.get(env) or default
    path = Path(chosen)
    path.mkdir(parents=True, exist_ok=True)
    return path


def setup(profile: str = "quick", seed: int = 0, data_root: str | None = None, device: str = "auto",
          run_dir: str | None = None, figures_dir: str | None = None, overrides: dict[str, Any] | None = None) -> NotebookContext:
    """Configuration for ``profile`` with the notebook's parameters, its data, and its output folders."""
    values: dict[str, Any] = {"seed": seed, "device": device, **(overrides or {})}
    if data_root:
        values["data.root"] = str(data_root)
    config = make_config(profile, values)
    runtime = configure_for(config)
    set_style()
    data = load_data(config)
    return NotebookContext(config, data, _folder(run_dir, RUN_DIR_ENV, f"../runs/{profile}"),
                           _folder(figures_dir, FIGURES_DIR_ENV, f"../figures/{profile}"), runtime)
