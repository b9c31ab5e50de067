"""Figures for the notebooks and the thesis: one print style, every figure drawn here, byte-stable files.

Every figure is made at its print size: one column (:data:`SINGLE_COLUMN`, 3.3 in) or the text width
(:data:`FULL_WIDTH`, 6.3 in), with 8 pt text (9 pt titles), so a PDF is included at 100% and its text is
as large as the caption's footnotes. Colours are Paul Tol's "bright" scheme (colour-blind safe, no two
reds or oranges side by side), always paired with a marker and a dash pattern so that a figure still
reads in grey. Methods and columns are shown by readable names (:data:`NAMES`), never code names.
Titles are optional (a thesis figure has a caption); notebooks pass them.

Written by hand rather than with a plotting framework's theme: seaborn's themes set fonts relative to a
screen context, and the sizes here must hold at print size exactly (``savefig.bbox`` stays "standard",
so the saved size is the figure size; constrained layout keeps labels and legends inside it).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter
import pandas as pd
import seaborn as sns

from .fileio import atomic_path

FORMATS = ("png", "pdf")
SINGLE_COLUMN = 3.3  # inches: one column of a two-column page
FULL_WIDTH = 6.3     # inches: the text width of an A4 / letter thesis page
WIDTHS = {"single": SINGLE_COLUMN, "full": FULL_WIDTH}
FONT_SIZE = 8
TITLE_SIZE = 9
# Paul Tol's "bright" qualitative scheme (https://personal.sron.nl/~pault/): blue, red, green, yellow,
# cyan, purple, grey, then black
PALETTE = ("#4477AA", "#EE6677", "#228833", "#CCBB44", "#66CCEE", "#AA3377", "#BBBBBB", "#000000")
MARKERS = ("o", "s", "D", "^", "v", "P", "X", "*")
DASHES = ("-", "--", ":", "-.", (0, (5, 1, 1, 1, 1, 1)), (0, (1, 1)), (0, (4, 2)), (0, (2, 1, 4, 1)))
SEQUENTIAL = "viridis"

NAMES = {
    # allocators
    "uniform": "uniform", "random": "random", "sensitivity": "sensitivity",
    "class_count": "class count", "class_count_sum": "class count (sum)",
    "classpath": "ClassPathQ (reference)", "classpath_cpq": "ClassPathQ (cpq)",
    "classpath_random_paths": "random paths (ablation)", "classpath_reversed": "reversed order (ablation)",
    "hawq": "HAWQ (per layer)", "hawq_channel": "HAWQ (per channel)", "hawq_class": "HAWQ (class-aware)",
    "aimet": "AIMET AMP",
    # columns
    "average_bits": "average weight bits", "bitops": "GBitOPs", "size_bytes": "size (bytes)",
    "test_after": "test top-1 after refinement (%)", "test_before": "test top-1 before refinement (%)",
    "val_after": "validation top-1 after refinement (%)", "val_before": "validation top-1 before refinement (%)",
    "val_accuracy": "validation top-1 (%)", "scales": "weight scales in the model",
    # PTQ-SL variants and compression methods
    "none": "plain", "permute": "permuted by range", "index_sort": "index maps, sorted",
    "index_kmeans": "index maps, k-means", "sort": "index maps, sorted", "kmeans": "index maps, k-means",
    "focused": "focused", "deep compression": "Deep Compression", "float": "full precision",
    "deep compression fp16 codebooks": "Deep Compression, fp16 codebooks", "pruned only": "pruned only",
    "huffman": "Huffman", "ans": "ANS", "zstd": "zstd",
}


def name(key: str) -> str:
    """The readable name of a method, column or variant (its code name with spaces where none is listed)."""
    return NAMES.get(key, str(key).replace("_", " "))


def style_rc() -> dict[str, object]:
    return {
        "font.size": FONT_SIZE, "axes.titlesize": TITLE_SIZE, "axes.labelsize": FONT_SIZE,
        "xtick.labelsize": FONT_SIZE, "ytick.labelsize": FONT_SIZE, "legend.fontsize": FONT_SIZE,
        "legend.title_fontsize": FONT_SIZE, "figure.titlesize": TITLE_SIZE, "figure.labelsize": FONT_SIZE,
        "axes.prop_cycle": plt.cycler(color=PALETTE), "lines.linewidth": 1.2, "lines.markersize": 4,
        "axes.linewidth": 0.6, "grid.linewidth": 0.4, "xtick.major.width": 0.6, "ytick.major.width": 0.6,
        "legend.frameon": False, "legend.handlelength": 2.4, "mathtext.fontset": "dejavusans",
        "figure.dpi": 100, "savefig.dpi": 200, "savefig.bbox": "standard", "pdf.fonttype": 42,
        "figure.constrained_layout.use": True, "image.cmap": SEQUENTIAL,
    }


def set_style() -> None:
    """The print style (global matplotlib settings; every figure function applies it itself)."""
    sns.set_theme(context="paper", style="whitegrid", palette=list(PALETTE), rc=style_rc())


def new_figure(width: str = "single", height: float | None = None, nrows: int = 1, ncols: int = 1,
               **subplots) -> tuple[plt.Figure, np.ndarray]:
    """A figure at print size: ``width`` "single" (3.3 in) or "full" (6.3 in); axes always as a 2-D array."""
    if width not in WIDTHS:
        raise ValueError(f"width {width!r}: expected one of {sorted(WIDTHS)}")
    set_style()
    inches = WIDTHS[width]
    fig, axes = plt.subplots(nrows, ncols, figsize=(inches, height or 0.68 * inches), squeeze=False, **subplots)
    return fig, axes


def _finish(fig: plt.Figure, title: str) -> plt.Figure:
    if title:
        fig.suptitle(title)
    return fig


def _style(index: int) -> dict[str, object]:
    return {"color": PALETTE[index % len(PALETTE)], "marker": MARKERS[index % len(MARKERS)],
            "ls": DASHES[index % len(DASHES)]}


def _legend_below(fig: plt.Figure, handles=None, labels=None, ncol: int = 3) -> None:
    """One figure-level legend under the axes (constrained layout makes room), never over the data or labels."""
    if handles is None:
        handles, labels = fig.axes[0].get_legend_handles_labels()
    renderer = fig.canvas.get_renderer()
    for columns in range(max(1, min(ncol, len(labels))), 0, -1):  # as many columns as fit the width
        legend = fig.legend(handles, labels, loc="outside lower center", ncol=columns)
        if columns == 1 or legend.get_window_extent(renderer).width <= fig.bbox.width:
            return
        legend.remove()


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


# --- 01 baseline -------------------------------------------------------------------------------------

def learning_curve(history: Sequence[dict], title: str = "", label_smoothing: float = 0.0) -> plt.Figure:
    """Training loss and validation accuracy per epoch (full width, two panels).

    The training loss is the one optimised, label-smoothed when ``label_smoothing`` > 0, so it sits
    above a plain cross-entropy; the legend says so rather than comparing the two as equals.
    """
    frame = pd.DataFrame(list(history))
    fig, axes = new_figure("full", 2.4, 1, 2)
    ax_loss, ax_acc = axes[0]
    every = max(1, len(frame) // 10)
    train_label = f"train (label smoothing {label_smoothing:g})" if label_smoothing else "train"
    ax_loss.plot(frame["epoch"], frame["train_loss"], label=train_label, markevery=every, **_style(0))
    if "val_loss" in frame:
        ax_loss.plot(frame["epoch"], frame["val_loss"], label="validation (plain cross-entropy)", markevery=every, **_style(1))
    ax_loss.set(xlabel="epoch", ylabel="loss")
    ax_loss.legend()
    ax_acc.plot(frame["epoch"], 100 * frame["train_accuracy"], label="train (augmented)", markevery=every, **_style(0))
    if "val_accuracy" in frame:
        ax_acc.plot(frame["epoch"], 100 * frame["val_accuracy"], label="validation", markevery=every, **_style(1))
    ax_acc.set(xlabel="epoch", ylabel="top-1 accuracy (%)")
    ax_acc.legend()
    return _finish(fig, title)


def per_class_bars(classes: Sequence[str], accuracy: Sequence[float], title: str = "") -> plt.Figure:
    """Per-class accuracy as horizontal bars, worst class at the top (one column)."""
    frame = pd.DataFrame({"class": list(classes), "accuracy": [100 * a for a in accuracy]}).sort_values("accuracy")
    fig, axes = new_figure("single", 0.16 * len(frame) + 0.8)
    ax = axes[0, 0]
    ax.barh(frame["class"], frame["accuracy"], color=PALETTE[0])
    ax.invert_yaxis()
    low = max(0.0, frame["accuracy"].min() - 10)
    ax.set(xlim=(low, 100), xlabel="top-1 accuracy (%)")
    return _finish(fig, title)


# --- 02 quantization basics --------------------------------------------------------------------------

def lines_by_group(frame: pd.DataFrame, x: str, y: str, group: str, ax: plt.Axes, dodge: float = 0.0) -> plt.Axes:
    """One line per group, told apart by colour, marker and dash pattern; ``dodge`` shifts each group's x
    by a step so that lines lying on one another stay visible."""
    groups = list(dict.fromkeys(frame[group]))
    for index, value in enumerate(groups):
        part = frame[frame[group] == value].sort_values(x)
        shift = dodge * (index - (len(groups) - 1) / 2)
        ax.plot(part[x] + shift, part[y], label=name(value), markerfacecolor="none" if index % 2 else None, **_style(index))
    return ax


def accuracy_vs_bits(accuracy: pd.DataFrame, float_accuracy: float, title: str = "") -> plt.Figure:
    """Validation accuracy against weight bits per granularity (``accuracy``: bits, config, accuracy in 0..1)."""
    fig, axes = new_figure("single", 2.9)
    ax = axes[0, 0]
    lines_by_group(accuracy.assign(accuracy=100 * accuracy["accuracy"]), "bits", "accuracy", "config", ax, dodge=0.06)
    ax.axhline(100 * float_accuracy, color="0.4", ls=":", lw=1, label="full precision")
    ax.set(xlabel="weight bits (every quantized layer)", ylabel="validation top-1 (%)")
    ax.set_xticks(sorted(accuracy["bits"].unique()))
    _legend_below(fig, ncol=2)
    return _finish(fig, title)


def error_per_layer(errors: pd.DataFrame, title: str = "") -> plt.Figure:
    """Relative weight error per layer (forward order) at the lowest and the highest bit-width, one line per
    granularity (``errors``: layer, bits, config, relative_error)."""
    bits = sorted(errors["bits"].unique())
    shown = [bits[0], bits[-1]] if len(bits) > 1 else bits
    fig, axes = new_figure("full", 2.8, 1, len(shown), sharey=False)
    layers = list(dict.fromkeys(errors["layer"]))
    for ax, width in zip(axes[0], shown):
        part = errors[errors["bits"] == width]
        for index, config in enumerate(dict.fromkeys(part["config"])):
            rows = part[part["config"] == config].set_index("layer").loc[layers]
            ax.plot(range(len(layers)), rows["relative_error"], label=name(config), markevery=1, **_style(index))
        ax.set(yscale="log", title=f"{width} bits", xlabel="layer (forward order)")
        ax.set_xticks(range(0, len(layers), max(1, len(layers) // 9)))
    axes[0, 0].set_ylabel(r"$\|Q(w) - w\| \,/\, \|w\|$")
    _legend_below(fig, ncol=4)
    return _finish(fig, title)


# --- 03 class scores ---------------------------------------------------------------------------------

def score_heatmaps(scores: dict[str, np.ndarray], class_names: Sequence[str], title: str = "",
                   full_precision: Sequence[str] = (), columns: int = 4, colorbar_label: str = "score") -> plt.Figure:
    """One heatmap per layer (classes x channels, channels sorted by class count), one shared colour bar."""
    names = list(scores)
    columns = min(columns, len(names))
    rows = int(np.ceil(len(names) / columns))
    fig, axes = new_figure("full", 1.05 * rows + 0.5, rows, columns)
    image = None
    for index, (ax, layer) in enumerate(zip(axes.flat, names)):
        matrix = scores[layer]
        order = np.argsort(-matrix.sum(0), kind="stable")
        image = ax.imshow(matrix[:, order], aspect="auto", vmin=0, vmax=1, cmap=SEQUENTIAL, interpolation="nearest")
        ax.grid(False)
        ax.set_title(layer + (" (fp)" if layer in full_precision else ""), fontsize=FONT_SIZE)
        ax.set_xticks([])
        if index % columns == 0:  # every second class name where ten would not fit a row's height
            shown = list(range(0, len(class_names), 2 if len(class_names) > 6 else 1)) if len(class_names) <= 20 else []
            ax.set_yticks(shown, [class_names[i] for i in shown])
            ax.set_ylabel("class")
        else:
            ax.set_yticks([])
        if index >= len(names) - columns:
            ax.set_xlabel("channel (by class count)")
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    fig.colorbar(image, ax=axes, label=colorbar_label, shrink=0.6, aspect=30)
    return _finish(fig, title)


def class_count_boxes(counts: pd.DataFrame, num_classes: int, title: str = "") -> plt.Figure:
    """Per layer, the distribution of channels' class counts, one box per order of reduction
    (``counts``: layer, class count, aggregate)."""
    fig, axes = new_figure("full", 2.8)
    ax = axes[0, 0]
    aggregates = list(dict.fromkeys(counts["aggregate"]))
    layers = list(dict.fromkeys(counts["layer"]))
    width = 0.8 / len(aggregates)
    handles = []
    for index, aggregate in enumerate(aggregates):  # matplotlib's boxplot: seaborn's passes a deprecated argument
        part = counts[counts["aggregate"] == aggregate]
        values = [part.loc[part["layer"] == layer, "class count"].to_numpy() for layer in layers]
        positions = np.arange(len(layers)) + (index - (len(aggregates) - 1) / 2) * width
        boxes = ax.boxplot(values, positions=positions, widths=0.9 * width, patch_artist=True, manage_ticks=False,
                           flierprops={"markersize": 1.5, "marker": "o"}, medianprops={"color": "black", "lw": 0.8},
                           boxprops={"lw": 0.5}, whiskerprops={"lw": 0.5}, capprops={"lw": 0.5})
        for patch in boxes["boxes"]:
            patch.set(facecolor=PALETTE[index], hatch=["", "//", ".."][index % 3], edgecolor="0.2")
        handles.append(plt.Rectangle((0, 0), 1, 1, facecolor=PALETTE[index], hatch=["", "//", ".."][index % 3],
                                     edgecolor="0.2", label=f"reduction: {aggregate}"))
    ax.set_xticks(range(len(layers)), layers, rotation=90)
    ax.set(ylim=(-0.3, num_classes + 0.3), xlabel="", ylabel="classes the channel matters for")
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=len(handles))
    return _finish(fig, title)


def scores_vs_depth(summary: pd.DataFrame, title: str = "") -> plt.Figure:
    """Mean score and the shares of channels important to every class and to none, against depth."""
    fig, axes = new_figure("single", 2.7)
    ax = axes[0, 0]
    for index, (column, label) in enumerate((("mean_score", "mean score"), ("universal", "important to every class"),
                                             ("dead", "important to no class"))):
        ax.plot(summary["depth"], summary[column], label=label, **_style(index))
    ax.set(xlabel="layer depth (forward order)", ylabel="fraction", ylim=(-0.05, 1.05))
    _legend_below(fig, ncol=2)
    return _finish(fig, title)


# --- 04 critical paths -------------------------------------------------------------------------------

def path_overlap(overlap: pd.DataFrame, title: str = "") -> plt.Figure:
    """Mean pairwise Jaccard of the class paths and the share of channels on no path, per layer."""
    fig, axes = new_figure("full", 2.6)
    ax = axes[0, 0]
    ax.plot(overlap["layer"], overlap["mean_jaccard"], label="mean pairwise Jaccard", **_style(0))
    ax.plot(overlap["layer"], overlap["unimportant_share"], label="share on no path (unimportant)", **_style(1))
    ax.set(ylim=(-0.05, 1.05), ylabel="fraction")
    ax.tick_params(axis="x", rotation=90)
    _legend_below(fig, ncol=2)
    return _finish(fig, title)


def _off_diagonal_range(matrix: np.ndarray) -> tuple[float, float]:
    values = matrix[~np.eye(len(matrix), dtype=bool)] if matrix.shape[0] == matrix.shape[1] and len(matrix) > 1 else matrix.ravel()
    return float(np.min(values)), float(np.max(values))


def similarity_heatmaps(jaccard: np.ndarray, interference: np.ndarray, class_names: Sequence[str], title: str = "") -> plt.Figure:
    """Jaccard similarity and interference degree between class paths. Each colour range spans the
    off-diagonal values (the diagonal, 1 by definition, is drawn hatched grey instead of setting the range)."""
    fig, axes = new_figure("full", 3.1, 1, 2)
    annotate = len(class_names) <= 10
    for ax, matrix, label, heading, xlabel in (
            (axes[0, 0], jaccard, r"$|P_i \cap P_j| \,/\, |P_i \cup P_j|$", "Jaccard similarity", "class j"),
            (axes[0, 1], interference, "mean class-j score per channel of $P_i$", "interference degree", "class j (score)")):
        low, high = _off_diagonal_range(np.asarray(matrix))
        masked = np.asarray(matrix, dtype=float).copy()
        np.fill_diagonal(masked, np.nan)
        sns.heatmap(masked, ax=ax, xticklabels=class_names, yticklabels=class_names, cmap="magma", vmin=low, vmax=high,
                    annot=annotate, fmt=".2f", annot_kws={"fontsize": FONT_SIZE - 1 if len(class_names) > 8 else FONT_SIZE},
                    cbar_kws={"label": label, "shrink": 0.8}, square=True)
        if annotate:
            for text in ax.texts:
                text.set_text(text.get_text().replace("0.", ".", 1))
        ax.set_facecolor("0.85")
        ax.grid(False)
        ax.set(title=heading, xlabel=xlabel, ylabel="class i (path)")
    return _finish(fig, title)


def order_vs_accuracy(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """The search order (total similarity, top first) beside each class's validation accuracy
    (``table``: class, total similarity, val accuracy (%), in search order)."""
    fig, axes = new_figure("full", 0.17 * len(table) + 0.9, 1, 2, sharey=True)
    left, right = axes[0]
    left.barh(table["class"], table["total similarity"], color=PALETTE[0])
    left.set(xlabel="total Jaccard similarity to the other classes")
    left.invert_yaxis()
    right.barh(table["class"], table["val accuracy (%)"], color=PALETTE[2], hatch="//", edgecolor="white")
    right.set(xlabel="validation top-1 (%)", xlim=(max(0, table["val accuracy (%)"].min() - 10), 100))
    return _finish(fig, title)


# --- 05 bit search -----------------------------------------------------------------------------------

def search_trajectory(trajectory: pd.DataFrame, title: str = "") -> plt.Figure:
    """A search step by step: validation accuracy of every tried plan (accepted filled, rejected hollow)
    and the average bits of the plan held after each step. Colour: the sub-search (e.g. the path
    sparsity, from phases named "s=<sparsity> <stage>"); marker: the stage."""
    frame = trajectory.copy()
    phase = frame["phase"].astype(str)
    split = phase.str.extract(r"^(s=\S+) (.*)$")
    frame["run"] = split[0].fillna("search")
    frame["stage"] = split[1].fillna(phase)
    fig, axes = new_figure("full", 3.6, 2, 1, sharex=True)
    ax_acc, ax_bits = axes[:, 0]
    runs, stages = list(dict.fromkeys(frame["run"])), list(dict.fromkeys(frame["stage"]))
    colors = {run: PALETTE[i % len(PALETTE)] for i, run in enumerate(runs)}
    markers = {stage: MARKERS[i % len(MARKERS)] for i, stage in enumerate(stages)}
    tried = frame.dropna(subset=["accuracy"])
    for (run, stage), group in tried.groupby(["run", "stage"], sort=False):
        accepted = group["accepted"].astype(bool)
        ax_acc.scatter(group.loc[accepted, "step"], 100 * group.loc[accepted, "accuracy"], color=colors[run],
                       marker=markers[stage], s=12)
        ax_acc.scatter(group.loc[~accepted, "step"], 100 * group.loc[~accepted, "accuracy"], facecolors="none",
                       edgecolors=colors[run], marker=markers[stage], s=12, linewidths=0.7)
    handles = [plt.Line2D([], [], color=colors[r], marker="s", ls="", label=r) for r in runs if len(runs) > 1]
    handles += [plt.Line2D([], [], color="0.3", marker=markers[s], ls="", label=s) for s in stages]
    handles.append(plt.Line2D([], [], color="0.3", marker="o", markerfacecolor="none", ls="", label="rejected"))
    ax_acc.set(ylabel="validation top-1 (%)")
    held = frame[frame["accepted"].astype(bool)]
    ax_bits.step(held["step"], held["average_bits"], where="post", color="black")
    ax_bits.set(xlabel="step (one tried plan each)", ylabel="average bits held")
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=min(5, len(handles)))
    return _finish(fig, title)


def bits_per_layer_bars(table: pd.DataFrame, title: str = "") -> plt.Figure:
    """Per layer, the share of its channels at each bit-width (stacked), mean bits printed at the end."""
    columns = [c for c in table.columns if c.endswith(" bits")]
    shares = table[columns].div(table[columns].sum(axis=1), axis=0)
    fig, axes = new_figure("full", 0.15 * len(table) + 1.1)
    ax = axes[0, 0]
    left = np.zeros(len(table))
    colors = sns.color_palette(SEQUENTIAL, len(columns))
    hatches = ["", "//", "..", "xx", "\\\\", "oo", "--", "++"]
    for index, column in enumerate(columns):
        ax.barh(table.index, shares[column], left=left, color=colors[index], hatch=hatches[index % len(hatches)],
                edgecolor="white", linewidth=0.3, label=column)
        left += shares[column].to_numpy()
    for y, mean in enumerate(table["mean_bits"]):
        ax.text(1.01, y, f"{mean:.2f}", va="center", fontsize=FONT_SIZE)
    ax.set(xlim=(0, 1.1), xlabel="share of the layer's channels (mean bits at the right)")
    ax.grid(False)
    ax.invert_yaxis()
    _legend_below(fig, ncol=len(columns))
    return _finish(fig, title)


def bits_per_class(per_class: pd.DataFrame, title: str = "") -> plt.Figure:
    """Bits of each class's critical path, classes in search order (``per_class``: class, bits)."""
    fig, axes = new_figure("single", 2.4)
    ax = axes[0, 0]
    ax.bar(per_class["class"].astype(str), per_class["bits"], color=PALETTE[0])
    ax.set(ylabel="bits of the class path", xlabel="class, in search order")
    ax.tick_params(axis="x", rotation=60)
    return _finish(fig, title)


def bits_vs_class_count(frame: pd.DataFrame, title: str = "") -> plt.Figure:
    """Every quantized channel: its class count against its bits (bits jittered so that points separate)."""
    rng = np.random.default_rng(0)
    fig, axes = new_figure("full", 2.8)
    ax = axes[0, 0]
    jitter = frame["bits"] + rng.uniform(-0.18, 0.18, len(frame))
    depth = pd.Categorical(frame["layer"], categories=list(dict.fromkeys(frame["layer"]))).codes
    points = ax.scatter(frame["class count"], jitter, c=depth, cmap=SEQUENTIAL, s=4, alpha=0.7, linewidths=0)
    means = frame.groupby("bits")["class count"].mean()
    ax.plot(means.to_numpy(), means.index, color="black", marker="D", ls="--", lw=1, label="mean class count per width")
    ax.set(xlabel="class count (classes the channel matters for)", ylabel="bits")
    ax.set_yticks(sorted(frame["bits"].unique()))
    fig.colorbar(points, ax=ax, label="layer (forward order)")
    _legend_below(fig, ncol=1)
    return _finish(fig, title)


# --- 06 refinement -----------------------------------------------------------------------------------

def refinement_curves(histories: dict[str, Sequence[dict]], title: str = "") -> plt.Figure:
    """Validation accuracy and training loss per refinement epoch, one line per run (full width)."""
    fig, axes = new_figure("full", 2.5, 1, 2)
    ax_acc, ax_loss = axes[0]
    for index, (label, history) in enumerate(histories.items()):
        frame = pd.DataFrame(list(history))
        ax_acc.plot(frame["epoch"], 100 * frame["val_accuracy"], label=name(label), **_style(index))
        ax_loss.plot(frame["epoch"], frame["train_loss"], label=name(label), **_style(index))
    ax_acc.set(xlabel="refinement epoch", ylabel="validation top-1 (%)")
    ax_loss.set(xlabel="refinement epoch", ylabel="training loss (CE + KL)")
    _legend_below(fig, ncol=len(histories))
    return _finish(fig, title)


def per_class_change(classes: Sequence[str], before: Sequence[float], after: Sequence[float], title: str = "") -> plt.Figure:
    """Per-class accuracy before and after, joined by a line (worst class after refinement at the top)."""
    frame = pd.DataFrame({"class": list(classes), "before": [100 * b for b in before], "after": [100 * a for a in after]})
    frame = frame.sort_values("after")
    fig, axes = new_figure("single", 0.17 * len(frame) + 1.0)
    ax = axes[0, 0]
    y = np.arange(len(frame))
    ax.hlines(y, frame["before"], frame["after"], color="0.6", lw=1)
    ax.scatter(frame["before"], y, marker="o", facecolors="none", edgecolors=PALETTE[1], label="before", zorder=3)
    ax.scatter(frame["after"], y, marker="D", color=PALETTE[0], label="after", zorder=3)
    ax.set_yticks(y, frame["class"])
    ax.invert_yaxis()
    ax.set(xlabel="test top-1 (%)")
    _legend_below(fig, ncol=2)
    return _finish(fig, title)


# --- 07 / 10 comparison ------------------------------------------------------------------------------

def comparison(table: pd.DataFrame, x: str = "average_bits", title: str = "", log_x: bool = False,
               width: str = "single", value: str = "test_after") -> plt.Figure:
    """Mean over seeds and its confidence interval against ``x`` ("average_bits" or "bitops", drawn in
    GBitOPs), one line per allocator. ``table``: :func:`cpq_lib.allocation.comparison_table`'s output
    (target, allocator, mean, ci_low, ci_high, average_bits, bitops); a single-seed point has no bar."""
    fig, axes = new_figure(width, 2.9 if width == "single" else 3.0)
    ax = axes[0, 0]
    xs = table[x] / 1e9 if x == "bitops" else table[x]
    frame = table.assign(_x=xs)
    for index, (allocator, group) in enumerate(frame.groupby("allocator", sort=False)):
        group = group.sort_values("_x")
        # an accuracy lies in [0, 100]: a Student-t interval of few seeds can reach past it; drawn truncated
        low = (group["mean"] - group["ci_low"].clip(lower=0)).fillna(0).clip(lower=0)
        high = (group["ci_high"].clip(upper=1) - group["mean"]).fillna(0).clip(lower=0)
        ax.errorbar(group["_x"], 100 * group["mean"], yerr=[100 * low, 100 * high], capsize=2, elinewidth=0.8,
                    label=name(allocator), **_style(index))
    spread = float(frame["_x"].max() / frame["_x"].min()) if (frame["_x"] > 0).all() else 1.0
    if log_x and spread > 4:  # a log axis over less than a factor of 4 only crowds its labels
        ax.set_xscale("log")
        formatter = ScalarFormatter()
        formatter.set_scientific(False)
        ax.xaxis.set_major_formatter(formatter)
        ax.xaxis.set_minor_formatter(NullFormatter())
    else:
        ax.xaxis.set_major_locator(MaxNLocator(nbins=4 if width == "single" else 6))
    ax.set(xlabel="GBitOPs per image" if x == "bitops" else name(x), ylabel=name(value))
    _legend_below(fig, ncol=2 if width == "single" else 3)
    return _finish(fig, title)


def before_after(frame: pd.DataFrame, title: str = "") -> plt.Figure:
    """Per target and allocator, mean test accuracy before (hollow) and after refinement (filled), joined
    (``frame``: one row per run with allocator, target, test_before, test_after)."""
    targets = list(dict.fromkeys(frame["target"]))
    fig, axes = new_figure("full", 0.2 * frame["allocator"].nunique() + 1.2, 1, len(targets), sharey=True)
    allocators = list(dict.fromkeys(frame["allocator"]))
    for ax, target in zip(axes[0], targets):
        means = frame[frame["target"] == target].groupby("allocator")[["test_before", "test_after"]].mean()
        for y, allocator in enumerate(allocators):
            if allocator not in means.index:
                continue
            before, after = 100 * means.loc[allocator]
            ax.plot([before, after], [y, y], color="0.6", lw=1)
            ax.scatter([before], [y], marker="o", facecolors="none", edgecolors=PALETTE[1], zorder=3)
            ax.scatter([after], [y], marker="D", color=PALETTE[0], zorder=3)
        ax.set(title=target, xlabel="test top-1 (%)")
    axes[0, 0].set_yticks(range(len(allocators)), [name(a) for a in allocators])
    axes[0, 0].invert_yaxis()
    handles = [plt.Line2D([], [], marker="o", markerfacecolor="none", markeredgecolor=PALETTE[1], ls="", label="before refinement"),
               plt.Line2D([], [], marker="D", color=PALETTE[0], ls="", label="after refinement")]
    _legend_below(fig, handles, [h.get_label() for h in handles], ncol=2)
    return _finish(fig, title)


# --- 08 granularity ----------------------------------------------------------------------------------

def accuracy_vs_granularity(results: pd.DataFrame, float_accuracy: float | None = None, title: str = "") -> plt.Figure:
    """Per target, validation accuracy per layout, the layouts in order of their number of weight scales
    (in brackets; layouts with equally many, such as channel-wise and C/2x2, side by side), one line per
    variant (reordering x search); dotted: channel-wise; dashed: full precision (``results``:
    ptqsl_study rows; with a ``seed`` column, the mean over seeds)."""
    targets = list(dict.fromkeys(results["target"]))
    columns = min(2, len(targets))
    rows = int(np.ceil(len(targets) / columns))
    fig, axes = new_figure("full", 2.2 * rows + 0.6, rows, columns)
    variant = results["reorder"].map(name) + results["search"].map({True: " + scale search", False: ""})
    frame = (results.assign(accuracy=100 * results["val_accuracy"], variant=variant)
             .groupby(["target", "variant", "granularity"], sort=False, as_index=False).agg(scales=("scales", "first"), accuracy=("accuracy", "mean")))
    layouts = (frame.drop_duplicates("granularity").assign(other=lambda f: f["granularity"] != "channel")
               .sort_values(["scales", "other"], kind="stable"))  # channel-wise first among its equals
    position = {g: i for i, g in enumerate(layouts["granularity"])}
    variants = list(dict.fromkeys(frame["variant"]))
    for ax, target in zip(axes.flat, targets):
        part = frame[frame["target"] == target]
        for index, label in enumerate(variants):
            rows_ = part[part["variant"] == label].assign(x=lambda f: f["granularity"].map(position)).sort_values("x")
            ax.plot(rows_["x"], rows_["accuracy"], label=label, **_style(index))
        if "channel" in position:
            ax.axvline(position["channel"], color="0.4", ls=":", lw=0.8)
        if float_accuracy is not None:
            ax.axhline(100 * float_accuracy, color="0.4", ls="--", lw=0.8)
        ax.set_xticks(range(len(layouts)), [f"{g} ({s})" for g, s in zip(layouts["granularity"], layouts["scales"])],
                      rotation=35, ha="right")
        ax.set(title=target, xlabel="layout (weight scales in the model)", ylabel="validation top-1 (%)")
    for ax in axes.flat[len(targets):]:
        ax.axis("off")
    _legend_below(fig, ncol=min(4, len(variants)))
    return _finish(fig, title)


def reordering_contrasts(contrasts: pd.DataFrame, title: str = "") -> plt.Figure:
    """Reordered - plain at the same layout, in points, with its confidence interval, one panel per target
    and search setting, one marker per reordering (``contrasts``: ``cpq_lib.ptq.reordering_contrasts`` rows)."""
    panels = list(dict.fromkeys(zip(contrasts["target"], contrasts["search"])))
    columns = min(2, len(panels))
    rows = int(np.ceil(len(panels) / columns))
    fig, axes = new_figure("full", 1.8 * rows + 0.6, rows, columns)  # own y scales: without the search gains reach tens of points
    reorders = list(dict.fromkeys(contrasts["reorder"]))
    layouts = list(dict.fromkeys(contrasts.sort_values("scales", kind="stable")["granularity"]))
    for ax, (target, searched) in zip(axes.flat, panels):
        part = contrasts[(contrasts["target"] == target) & (contrasts["search"] == searched)]
        for index, reorder in enumerate(reorders):
            rows_ = part[part["reorder"] == reorder].set_index("granularity").reindex(layouts).dropna(subset=["difference"])
            xs = np.array([layouts.index(g) for g in rows_.index]) + (index - (len(reorders) - 1) / 2) * 0.2
            low = (rows_["difference"] - rows_["ci_low"]).fillna(0).clip(lower=0)
            high = (rows_["ci_high"] - rows_["difference"]).fillna(0).clip(lower=0)
            ax.errorbar(xs, rows_["difference"], yerr=[low, high], fmt=MARKERS[index], color=PALETTE[index], capsize=2,
                        lw=0.8, ms=3.5, label=name(reorder))
        ax.axhline(0, color="0.4", lw=0.8, ls=":")
        ax.set_xticks(range(len(layouts)), layouts, rotation=35, ha="right")
        ax.set(title=f"{target}, {'scale search' if searched else 'no search'}")
    for ax in axes[:, 0]:
        ax.set_ylabel("reordered - plain (points)")
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    _legend_below(fig, ncol=len(reorders))
    return _finish(fig, title)


# --- 09 focused quantization -------------------------------------------------------------------------

def pipeline_accuracy(stages: pd.DataFrame, title: str = "") -> plt.Figure:
    """Validation accuracy along the compression pipeline: pruning and focused steps joined by a line, the
    models made beside it from the same pruned model (Deep Compression, the pruned-only control) as points."""
    stage = stages["stage"].astype(str)
    groups = {"Deep Compression (same pruned model)": stage.str.startswith("deep compression"),
              "pruned only, same extra epochs": stage.str.startswith("pruned only")}
    separate = groups["Deep Compression (same pruned model)"] | groups["pruned only, same extra epochs"]
    fig, axes = new_figure("full", 2.6)
    ax = axes[0, 0]
    steps = stages[~separate]
    ax.plot(range(len(steps)), 100 * steps["val_accuracy"], label="pruning, then focused quantization", **_style(0))
    position, labels = len(steps), list(steps["stage"])
    for index, (label, chosen) in enumerate(groups.items(), start=1):
        points = stages[chosen]
        if points.empty:
            continue
        xs = list(range(position, position + len(points)))
        ax.scatter(xs, 100 * points["val_accuracy"], marker="sD"[index - 1], color=PALETTE[index], zorder=3, label=label)
        position += len(points)
        labels += list(points["stage"])
    ax.set_xticks(range(len(labels)), labels, rotation=35, ha="right")
    ax.set(ylabel="validation top-1 (%)")
    _legend_below(fig, ncol=3)
    return _finish(fig, title)


def mixture_histogram(weights: np.ndarray, centres: Sequence[float], spreads: Sequence[float], shares: Sequence[float] | None,
                      levels: np.ndarray, title: str = "") -> plt.Figure:
    """Histogram of a layer's non-zero weights, the fitted Gaussians (scaled by their shares) and the quantization levels."""
    values = np.asarray(weights, dtype=float)
    values = values[values != 0]
    fig, axes = new_figure("full", 2.6)
    ax = axes[0, 0]
    ax.hist(values, bins=120, density=True, color="0.75", label="non-zero weights")
    grid = np.linspace(values.min(), values.max(), 600)
    shares = list(shares) if shares is not None else [1.0] * len(centres)
    for index, (mu, sigma, share) in enumerate(zip(centres, spreads, shares)):
        density = share * np.exp(-0.5 * ((grid - mu) / sigma) ** 2) / (sigma * np.sqrt(2 * np.pi))
        ax.plot(grid, density, lw=1.2, color=PALETTE[index % len(PALETTE)], ls=DASHES[index % len(DASHES)],
                label=rf"component {index + 1}: $\mathcal{{N}}({mu:.3g}, {sigma:.3g}^2)$")
    for level in np.unique(levels):
        ax.axvline(level, color=PALETTE[5], lw=0.5, alpha=0.7)
    ax.plot([], [], color=PALETTE[5], lw=0.5, label=f"{len(np.unique(levels))} levels")
    ax.set(xlabel="weight", ylabel="density")
    _legend_below(fig, ncol=2)
    return _finish(fig, title)


def compression_bars(sizes: pd.DataFrame, accuracy: Mapping[str, float], title: str = "") -> plt.Figure:
    """Compression ratio against fp32 per method and lossless coder, with each method's test accuracy
    in its label (``sizes``: the totals rows of the coded sizes: method, coder, ratio)."""
    totals = sizes[sizes["layer"] == "total"] if "layer" in sizes else sizes
    methods = list(dict.fromkeys(totals["method"]))
    coders = list(dict.fromkeys(totals["coder"]))
    fig, axes = new_figure("single", 2.6)
    ax = axes[0, 0]
    width = 0.8 / len(coders)
    hatches = ["", "//", ".."]
    for index, coder in enumerate(coders):
        part = totals[totals["coder"] == coder].set_index("method").reindex(methods)
        ax.bar(np.arange(len(methods)) + (index - (len(coders) - 1) / 2) * width, part["ratio"], width,
               color=PALETTE[index], hatch=hatches[index % 3], edgecolor="white", linewidth=0.3, label=name(coder))
    labels = [f"{name(m)}\n{100 * accuracy[m]:.1f}% test" if m in accuracy else name(m) for m in methods]
    ax.set_xticks(range(len(methods)), labels)
    ax.set(ylabel="compression ratio vs fp32")
    _legend_below(fig, ncol=len(coders))
    return _finish(fig, title)


def memory_vs_size(frame: pd.DataFrame, title: str = "") -> plt.Figure:
    """Peak resident memory of the same stages against the number of images, per data path (``images``,
    ``peak_rss_mb``, ``path``): a lazily read data set stays flat, one decoded into memory grows with it."""
    fig, axes = new_figure("single")
    ax = axes[0, 0]
    for index, (path, rows) in enumerate(frame.sort_values("images").groupby("path", sort=False)):
        ax.plot(rows["images"], rows["peak_rss_mb"], label=path, **_style(index))
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_xticks(sorted(frame["images"].unique()))
    ax.set(xlabel="images in the data set", ylabel="peak resident memory (MB)")
    ax.set_ylim(bottom=0)
    _legend_below(fig, ncol=2)
    return _finish(fig, title)
