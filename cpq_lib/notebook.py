"""Notebook context: turns a notebook's parameters into config, data, folders and result records.

Notebooks stay thin: they call ``setup(...)`` once, then library functions, tables and plots. The data
set is loaded on first use of ``ctx.data`` (a notebook that shows committed results needs none), and
``results_setup`` serves a notebook that reads ``results/`` alone. Folder defaults are relative to the notebook (``../runs/<profile>``, ``../figures/<profile>``) and can
be redirected with ``CPQ_RUN_DIR`` / ``CPQ_FIGURES_DIR`` (tests use this to keep the clone clean).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import pandas as pd

import matplotlib.pyplot as plt

from .config import ExperimentConfig, make_config
from .data import DataBundle
from .fileio import atomic_write_json
from .pipeline import load_data
from .plots import save_figure, set_style
from .tables import write_latex
from .provenance import package_summary, run_record
from .runtime import configure_for

RUN_DIR_ENV = "CPQ_RUN_DIR"
FIGURES_DIR_ENV = "CPQ_FIGURES_DIR"
REPO = Path(__file__).resolve().parent.parent


@dataclass
class Outputs:
    """Where a notebook's figures and LaTeX tables go."""
    figures_dir: Path

    def save_figure(self, fig: plt.Figure, name: str) -> None:
        """Save under the figure folder (PNG and PDF); the figure still displays inline."""
        save_figure(fig, self.figures_dir, name)

    def save_table(self, frame: pd.DataFrame, name: str, caption: str, **options: Any) -> Path:
        """Write ``frame`` beside the figures as ``name.tex`` (a booktabs table for the thesis)."""
        return write_latex(frame, self.figures_dir / f"{name}.tex", caption=caption, label=f"tab:{name}", **options)


@dataclass
class NotebookContext(Outputs):
    config: ExperimentConfig = field(default=None)  # type: ignore[assignment]
    run_dir: Path = field(default=None)  # type: ignore[assignment]
    runtime: dict[str, Any] = field(default_factory=dict)
    _data: DataBundle | None = None

    @property
    def data(self) -> DataBundle:
        """The profile's data set, loaded on first use."""
        if self._data is None:
            self._data = load_data(self.config)
        return self._data

    @property
    def device(self) -> str:
        return self.config.resolved_device()

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
    return NotebookContext(figures_dir=_folder(figures_dir, FIGURES_DIR_ENV, f"../figures/{profile}"), config=config,
                           run_dir=_folder(run_dir, RUN_DIR_ENV, f"../runs/{profile}"), runtime=runtime)


@dataclass
class ResultsContext(Outputs):
    """A notebook that draws committed results: no data set, no model, no run folder."""
    results_dir: Path = field(default=None)  # type: ignore[assignment]


def results_setup(results: str = "cifar10", figures_dir: str | None = None) -> ResultsContext:
    """The committed results of ``results`` (``../results/<results>``) and the figure folder
    (``../figures/<results>``); refuses a results folder that does not exist, naming those that do."""
    folder = Path("..") / "results" / results
    if not folder.is_dir():
        available = sorted(p.name for p in (Path("..") / "results").glob("*") if p.is_dir())
        raise FileNotFoundError(f"results {results!r}: no folder {folder}; committed results: {available}")
    set_style()
    return ResultsContext(figures_dir=_folder(figures_dir, FIGURES_DIR_ENV, f"../figures/{results}"), results_dir=folder)


def select_committed(frame: pd.DataFrame, requested: Mapping[str, Sequence[Any] | None], source: str | Path) -> pd.DataFrame:
    """The rows of committed results ``frame`` that a notebook's parameters ask for.

    ``requested``: column -> the values the parameters name (None: all). A value the committed results
    were not made with is refused (ValueError naming it and the values there are) rather than silently
    shown as something else; the notebook says which file it shows and how to run it instead.
    """
    chosen = frame
    for column, values in requested.items():
        if values is None:
            continue
        present = list(dict.fromkeys(frame[column]))
        missing = [v for v in values if v not in present]
        if missing:
            raise ValueError(f"{column} {missing}: the committed results in {Path(source).name} were made with "
                             f"{present}; pick from those, or set rerun=True to run with these parameters")
        chosen = chosen[chosen[column].isin(list(values))]
    print(f"showing committed results ({len(chosen)} of {len(frame)} rows of {Path(source).name}); "
          "set rerun=True to run instead")
    return chosen



def committed_runs(csv: str | Path, records: str | Path, requested: Mapping[str, Sequence[Any] | None] | None = None
                   ) -> tuple[pd.DataFrame | None, dict[str, dict]]:
    """A committed sweep's rows (those ``requested`` asks for, as :func:`select_committed`) and the records of
    those runs that are committed in the folder ``records`` (run name -> record; for McNemar tests).
    ``(None, {})`` when ``csv`` is not there: a study that has not been committed yet."""
    csv, records = Path(csv), Path(records)
    if not csv.is_file():
        return None, {}
    frame = select_committed(pd.read_csv(csv), requested or {}, csv)
    found = {run: records / f"{run}.json" for run in frame["run"]}
    return frame, {run: json.loads(path.read_text(encoding="utf-8")) for run, path in found.items() if path.is_file()}


def committed_record(profile: str, allocator: str, weight_bits: float, act_bits: int, seed: int) -> tuple[dict, Path] | None:
    """The committed record of one experiment (``../results/<profile>/records/<allocator>-W<w>-A<a>-s<seed>-*.json``),
    the newest when several code versions are there; None when there is none."""
    folder = Path("..") / "results" / profile / "records"
    matches = sorted(folder.glob(f"{allocator}-W{weight_bits:g}-A{act_bits}-s{seed}-*.json"))
    if not matches:
        return None
    records = [(json.loads(path.read_text(encoding="utf-8")), path) for path in matches]
    return max(records, key=lambda item: str(item[0].get("created", "")))


def resolve_parameters(given: Mapping[str, Any], defaults: Mapping[str, Any], committed: Mapping[str, Any] | None,
                       source: str | Path = "the committed results") -> dict[str, Any]:
    """A notebook's parameters where None means "the default": the defaults when it runs, the committed
    results' values when it shows them. A parameter set to a value the committed results were not made
    with is refused (ValueError naming each one) instead of being silently ignored."""
    if committed is None:
        return {key: defaults[key] if given.get(key) is None else given[key] for key in defaults}

    def same(a: Any, b: Any) -> bool:
        return (list(a) == list(b)) if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)) else a == b

    wrong = {key: (value, committed[key]) for key, value in given.items() if value is not None and not same(value, committed[key])}
    if wrong:
        listed = ", ".join(f"{key}={value!r} (committed: {made!r})" for key, (value, made) in wrong.items())
        raise ValueError(f"{listed}: {Path(source).name} was made otherwise; leave these at None to show it, "
                         "or set rerun=True to run with them")
    return {key: committed[key] for key in defaults}
