"""Figure helpers: one look for every notebook, and byte-stable PNG/PDF files per profile."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib.pyplot as plt
import numpy as np
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


def learning_curve(history: Sequence[dict], title: str = "", label_smoothing: float = 0.0) -> plt.Figure:
    """Training loss and validation accuracy per epoch.

    The training loss is the one optimised, label-smoothed when ``label_smoothing`` > 0, so it sits
    above a plain cross-entropy; the legend says so rather than comparing the two as equals.
    """
    frame = pd.DataFrame(list(history))
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.2))
    train_label = f"train (label smoothing {label_smoothing:g})" if label_smoothing else "train"
    ax_loss.plot(frame["epoch"], frame["train_loss"], label=train_label, marker="o", markevery=max(1, len(frame) // 10))
    if "val_loss" in frame:
        ax_loss.plot(frame["epoch"], frame["val_loss"], label="validation (plain cross-entropy)", marker="s",
                     markevery=max(1, len(frame) // 10), ls="--")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_loss.legend(fontsize=8)
    ax_acc.plot(frame["epoch"], 100 * frame["train_accuracy"], label="train (augmented)", marker="o", markevery=max(1, len(frame) // 10))
    if "val_accuracy" in frame:
        ax_acc.plot(frame["epoch"], 100 * frame["val_accuracy"], label="validation", marker="s",
                    markevery=max(1, len(frame) // 10), ls="--")
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)", title="accuracy")
    ax_acc.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def lines_by_group(frame: pd.DataFrame, x: str, y: str, group: str, ax: plt.Axes) -> plt.Axes:
    """One line per group, told apart by colour (colour-blind palette), marker and dash pattern."""
    sns.lineplot(data=frame, x=x, y=y, hue=group, style=group, markers=True, dashes=True,
                 palette="colorblind", ax=ax, markersize=7)
    return ax


def score_heatmaps(scores: dict[str, np.ndarray], class_names: Sequence[str], title: str,
                   full_precision: Sequence[str] = (), columns: int = 4, colorbar_label: str = "score") -> plt.Figure:
    """One heatmap per layer (classes x channels, channels sorted by class count), one shared colour bar."""
    names = list(scores)
    columns = min(columns, len(names))
    rows = int(np.ceil(len(names) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(3.2 * columns + 0.8, 2.3 * rows + 0.6), squeeze=False)
    image = None
    for index, (ax, name) in enumerate(zip(axes.flat, names)):
        matrix = scores[name]
        order = np.argsort(-matrix.sum(0), kind="stable")
        image = ax.imshow(matrix[:, order], aspect="auto", vmin=0, vmax=1, cmap="viridis", interpolation="nearest")
        ax.set_title(name + (" (fp)" if name in full_precision else ""), fontsize=9)
        ax.set_xticks([])
        if index % columns == 0:
            ax.set_yticks(range(len(class_names)), class_names if len(class_names) <= 20 else [""] * len(class_names), fontsize=7)
            ax.set_ylabel("class")
        else:
            ax.set_yticks([])
        if index >= len(names) - columns:
            ax.set_xlabel("channel (by class count)", fontsize=8)
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.suptitle(title, y=1.0)
    fig.tight_layout(rect=(0, 0, 0.92, 1))
    colorbar_axes = fig.add_axes((0.93, 0.15, 0.015, 0.7))
    fig.colorbar(image, cax=colorbar_axes, label=colorbar_label)
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
