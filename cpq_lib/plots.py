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


def search_trajectory(trajectory: pd.DataFrame, title: str = "") -> plt.Figure:
    """A search step by step: validation accuracy of every tried plan (accepted filled, rejected hollow)
    and the average bits of the plan held after each step. Colour: the sub-search (e.g. the path
    sparsity, from phases named "s=<sparsity> <stage>"); marker: the stage."""
    frame = trajectory.copy()
    phase = frame["phase"].astype(str)
    split = phase.str.extract(r"^(s=\S+) (.*)$")
    frame["run"] = split[0].fillna("search")
    frame["stage"] = split[1].fillna(phase)
    fig, (ax_acc, ax_bits) = plt.subplots(2, 1, figsize=(8, 5.4), sharex=True)
    runs, stages = list(dict.fromkeys(frame["run"])), list(dict.fromkeys(frame["stage"]))
    colors = dict(zip(runs, sns.color_palette("colorblind", len(runs))))
    markers = dict(zip(stages, "osD^v<>ph*"))
    tried = frame.dropna(subset=["accuracy"])
    for (run, stage), group in tried.groupby(["run", "stage"], sort=False):
        accepted = group["accepted"].astype(bool)
        ax_acc.scatter(group.loc[accepted, "step"], 100 * group.loc[accepted, "accuracy"], color=colors[run],
                       marker=markers[stage], s=20)
        ax_acc.scatter(group.loc[~accepted, "step"], 100 * group.loc[~accepted, "accuracy"], facecolors="none",
                       edgecolors=colors[run], marker=markers[stage], s=20)
    handles = [plt.Line2D([], [], color=colors[r], marker="s", ls="", label=r) for r in runs if len(runs) > 1]
    handles += [plt.Line2D([], [], color="grey", marker=markers[s], ls="", label=s) for s in stages]
    ax_acc.legend(handles=handles, fontsize=7, ncol=2, loc="lower left")
    ax_acc.set(ylabel="validation top-1 (%)", title=title or "search trajectory (hollow: tried and rejected)")
    held = frame[frame["accepted"].astype(bool)]
    ax_bits.step(held["step"], held["average_bits"], where="post", color="black")
    ax_bits.set(xlabel="step (one tried plan each)", ylabel="average weight bits (plan held)")
    fig.tight_layout()
    return fig


def bits_per_layer_bars(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Per layer, the share of its channels at each bit-width (stacked), mean bits printed at the end."""
    columns = [c for c in table.columns if c.endswith(" bits")]
    shares = table[columns].div(table[columns].sum(axis=1), axis=0)
    fig, ax = plt.subplots(figsize=(7.5, 0.32 * len(table) + 1.4))
    left = np.zeros(len(table))
    colors = sns.color_palette("viridis", len(columns))
    hatches = ["", "//", "..", "xx", "\\\\", "oo", "--", "++"]
    for index, column in enumerate(columns):
        ax.barh(table.index, shares[column], left=left, color=colors[index], hatch=hatches[index % len(hatches)],
                edgecolor="white", label=column)
        left += shares[column].to_numpy()
    for y, mean in enumerate(table["mean_bits"]):
        ax.text(1.01, y, f"{mean:.2f}", va="center", fontsize=7)
    ax.set(xlim=(0, 1.08), xlabel="share of the layer's channels (mean bits at the right)", title=title)
    ax.invert_yaxis()
    ax.legend(fontsize=7, ncol=len(columns), loc="upper center", bbox_to_anchor=(0.5, -0.12 - 0.6 / max(4, len(table))))
    fig.tight_layout()
    return fig


def bits_vs_class_count(frame: pd.DataFrame, title: str = "") -> plt.Figure:
    """Every quantized channel: its class count against its bits (bits jittered so that points separate)."""
    rng = np.random.default_rng(0)
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    jitter = frame["bits"] + rng.uniform(-0.18, 0.18, len(frame))
    depth = pd.Categorical(frame["layer"], categories=list(dict.fromkeys(frame["layer"]))).codes
    points = ax.scatter(frame["class count"], jitter, c=depth, cmap="viridis", s=9, alpha=0.7)
    means = frame.groupby("bits")["class count"].mean()
    ax.plot(means.to_numpy(), means.index, color="black", marker="D", ls="--", lw=1, label="mean class count per width")
    ax.set(xlabel="class count (classes the channel matters for)", ylabel="bits", title=title)
    ax.set_yticks(sorted(frame["bits"].unique()))
    layers = int(depth.max()) + 1
    fig.colorbar(points, ax=ax, label="layer (forward order)", ticks=range(layers) if layers <= 20 else None)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def refinement_curves(histories: dict[str, Sequence[dict]], title: str = "") -> plt.Figure:
    """Validation accuracy and training loss per refinement epoch, one line per run."""
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(9.5, 3.3))
    markers = "osD^v<>ph"
    for index, (label, history) in enumerate(histories.items()):
        frame = pd.DataFrame(list(history))
        ax_acc.plot(frame["epoch"], 100 * frame["val_accuracy"], marker=markers[index % 9], label=label)
        ax_loss.plot(frame["epoch"], frame["train_loss"], marker=markers[index % 9], label=label)
    ax_acc.set(xlabel="refinement epoch", ylabel="validation top-1 (%)", title="accuracy")
    ax_loss.set(xlabel="refinement epoch", ylabel="distillation loss", title="training loss (CE + KL)")
    ax_acc.legend(fontsize=7)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def per_class_change(classes: Sequence[str], before: Sequence[float], after: Sequence[float], title: str = "") -> plt.Figure:
    """Per-class accuracy before and after, as arrows (worst class after refinement at the top)."""
    frame = pd.DataFrame({"class": list(classes), "before": [100 * b for b in before], "after": [100 * a for a in after]})
    frame = frame.sort_values("after")
    fig, ax = plt.subplots(figsize=(6, 0.3 * len(frame) + 1.3))
    y = np.arange(len(frame))
    ax.hlines(y, frame["before"], frame["after"], color="grey", lw=1)
    ax.scatter(frame["before"], y, marker="o", facecolors="none", edgecolors=sns.color_palette("colorblind")[3], label="before")
    ax.scatter(frame["after"], y, marker="D", color=sns.color_palette("colorblind")[0], label="after")
    ax.set_yticks(y, frame["class"])
    ax.set(xlabel="test top-1 (%)", title=title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def comparison(frame: pd.DataFrame, x: str, y: str = "test_after", title: str = "", log_x: bool = False) -> plt.Figure:
    """Mean and standard deviation over seeds of ``y`` against ``x``, one line per allocator."""
    summary = frame.groupby(["allocator", "target"]).agg(x=(x, "mean"), mean=(y, "mean"), std=(y, "std")).reset_index()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    palette = sns.color_palette("colorblind", summary["allocator"].nunique())
    for index, (allocator, group) in enumerate(summary.groupby("allocator")):
        group = group.sort_values("x")
        ax.errorbar(group["x"], 100 * group["mean"], yerr=100 * group["std"].fillna(0), marker="osD^v"[index % 5],
                    ls=["-", "--", ":", "-.", (0, (3, 1, 1, 1))][index % 5], color=palette[index], capsize=3, label=allocator)
    if log_x:
        ax.set_xscale("log")
    ax.set(xlabel=x.replace("_", " "), ylabel=f"{y.replace('_', ' ')} top-1 (%)", title=title)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def mixture_histogram(weights: np.ndarray, centres: Sequence[float], spreads: Sequence[float], shares: Sequence[float] | None,
                      levels: np.ndarray, title: str = "") -> plt.Figure:
    """Histogram of a layer's non-zero weights, the fitted Gaussians (scaled by their shares) and the quantization levels."""
    values = np.asarray(weights, dtype=float)
    values = values[values != 0]
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    ax.hist(values, bins=120, density=True, color="0.75", label="non-zero weights")
    grid = np.linspace(values.min(), values.max(), 600)
    shares = list(shares) if shares is not None else [1.0] * len(centres)
    for index, (mu, sigma, share) in enumerate(zip(centres, spreads, shares)):
        density = share * np.exp(-0.5 * ((grid - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        ax.plot(grid, density, lw=1.5, label=f"component {index + 1}: N({mu:.3g}, {sigma:.3g}^2)")
    for level in np.unique(levels):
        ax.axvline(level, color="C3", lw=0.6, alpha=0.7)
    ax.plot([], [], color="C3", lw=0.6, label=f"{len(np.unique(levels))} levels")
    ax.set(xlabel="weight", ylabel="density", title=title)
    ax.legend(fontsize=7)
    return fig
