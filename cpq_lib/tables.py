"""Tables for a thesis: a data frame as a LaTeX booktabs table, written atomically beside the figures.

pandas' Styler writes the LaTeX (it needs jinja2, which jupyterlab already brings); this module only
fixes the conventions: booktabs rules, readable column names, a caption and a label, no index name row.
"""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd

from .fileio import atomic_path


def to_latex(frame: pd.DataFrame, caption: str, label: str, precision: int = 1) -> str:
    """``frame`` as a booktabs ``table`` environment; floats at ``precision`` decimals, NaN as an en dash."""
    styler = frame.style.format(precision=precision, na_rep="--").format_index(escape="latex", axis=1) \
        .format_index(escape="latex", axis=0)
    styler = styler.format(precision=precision, na_rep="--", escape="latex")
    return styler.to_latex(hrules=True, caption=caption, label=label, position="tbp", position_float="centering")


def write_latex(frame: pd.DataFrame, path: str | os.PathLike, caption: str, label: str, precision: int = 1) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = to_latex(frame, caption, label, precision)
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")
    return path
