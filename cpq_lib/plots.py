"""Figure helpers: one look for every notebook, and byte-stable PNG/PDF files per profile."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .fileio import atomic_path

FORMATS = ("png", "pdf")


def set_style() -> None:
    sns.set_theme(context="notebook", style="whitegrid", palette="colorblind")
    plt.rcParams.update({"figure.dpi": 100, "savefig.dpi": 150, "savefig.bbox": "tight", "pdf.fonttype": 42})


def save_figure(fig: plt.Figure, folder: str | os.PathLike, name: str, formats: Sequence[str] = FORMATS) -> list[Path]:
    """Save ``fig`` as ``folder/name.<fmt>``; dates and versions are stripped so reruns give the same bytes."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = []
    for fmt in formats:
        metadata = {"CreationDate": None, "ModDate": None, "Producer": None, "Creator": None} if fmt == "pdf" else {"Software": None}
        path = folder / f"{name}.{fmt}"
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, metadata=metadata)
        written.append(path)
    return written


def learning_curve(history: Sequence[dict], title: str = "") -> plt.Figure:
    """Training loss and validation accuracy per epoch."""
    frame = pd.DataFrame(list(history))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    ax_loss.plot(frame["epoch"], frame["train_loss"], label="train")
    if "val_loss" in frame:
        ax_loss.plot(frame["epoch"], frame["val_loss"], label="validation")
    ax_loss.set(xlabel="epoch", ylabel="cross-entropy loss", title="loss")
    ax_loss.legend()
    ax_acc.plot(frame["epoch"], 100 * frame["train_accuracy"], label="train")
    if "val_accuracy" in frame:
        ax_acc.plot(frame["epoch"], 100 * frame["val_accuracy"], label="validation")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    ax_acc.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def per_class_bars(classes: Sequence[str], accuracy: Sequence[float], title: str = "") -> plt.Figure:
    """Per-class accuracy as horizontal bars, worst class at the top."""
    frame = pd.DataFrame({"class": list(classes), "accuracy": [100 * a for a in accuracy]}).sort_values("accuracy")
    fig, ax = plt.subplots(figsize=(6, 0.28 * len(frame) + 1.2))
    sns.barplot(data=frame, y="class", x="accuracy", ax=ax, color=sns.color_palette()[0], orient="h")
    low = max(0.0, frame["accuracy"].min() - 10)
    ax.set(xlim=(low, 100), xlabel="top-1 accuracy (%)", ylabel="", title=title)
    fig.tight_layout()
    return fig
