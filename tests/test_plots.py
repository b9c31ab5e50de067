"""Every figure function renders on small data at a print size, with 8-9 pt text and legends clear of
every label; files are byte-stable."""

import inspect
import io

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.text import Text

from cpq_lib import plots

RNG = np.random.default_rng(0)
CLASSES = [f"class{i}" for i in range(10)]


def _history(epochs: int = 4) -> list[dict]:
    return [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5 + e / 20, "val_accuracy": 0.4 + e / 20}
            for e in range(1, epochs + 1)]


def _comparison_table() -> pd.DataFrame:
    rows = []
    for t, target in enumerate(("W2A2", "W3A3", "W4A4")):
        for a, allocator in enumerate(("uniform", "classpath", "classpath_cpq", "sensitivity", "classpath_random_paths")):
            mean = 0.8 + 0.04 * t + 0.005 * a
            rows.append({"target": target, "allocator": allocator, "mean": mean, "ci_low": mean - 0.01, "ci_high": mean + 0.01,
                         "average_bits": 2.05 + t, "bitops": 0.9e9 * (t + 1) ** 2, "runs": 3})
    return pd.DataFrame(rows)


def _runs() -> pd.DataFrame:
    table = _comparison_table()
    return table.assign(test_before=table["mean"] - 0.2, test_after=table["mean"])


def _ptqsl() -> pd.DataFrame:
    rows = []
    for target in ("W4A8", "W4A4", "W3A8"):
        for g, (granularity, scales) in enumerate((("layer", 18), ("4x1", 72), ("channel", 672), ("16x4", 2000))):
            for reorder in ("none", "sort"):
                for search in (False, True):
                    rows.append({"target": target, "granularity": granularity, "scales": scales, "reorder": reorder,
                                 "search": search, "val_accuracy": 0.7 + 0.03 * g + 0.01 * search})
    return pd.DataFrame(rows)


def _contrasts() -> pd.DataFrame:
    rows = []
    for target in ("W4A4", "W3A4"):
        for search in (False, True):
            for g, (granularity, scales) in enumerate((("4x1", 72), ("8x2", 288), ("16x2", 576), ("C/2x2", 672))):
                for reorder in ("permute", "index_sort"):
                    difference = 0.5 * g - 0.3 * search
                    rows.append({"target": target, "search": search, "granularity": granularity, "reorder": reorder, "scales": scales,
                                 "seeds": 3, "difference": difference, "ci_low": difference - 0.4, "ci_high": difference + 0.6})
    return pd.DataFrame(rows)


def _stages() -> pd.DataFrame:
    names = ["float", "pruned 1/2", "pruned 2/2", "focused 0.5", "focused 1", "deep compression 5-bit"]
    return pd.DataFrame({"stage": names, "sparsity": [0, .5, .8, .8, .8, .8], "val_accuracy": [.9, .89, .88, .87, .88, .87]})


def _trajectory() -> pd.DataFrame:
    phases = ["s=0.5 phase 1"] * 4 + ["s=0.5 phase 2"] * 3 + ["s=0.9 phase 1"] * 3
    return pd.DataFrame({"step": range(10), "phase": phases, "accuracy": RNG.uniform(0.3, 0.6, 10),
                         "accepted": [True, False] * 5, "average_bits": np.linspace(8, 2, 10)})


def _bits_table() -> pd.DataFrame:
    layers = [f"layer{i}" for i in range(18)]
    counts = RNG.integers(0, 8, (18, 3))
    table = pd.DataFrame(counts, index=layers, columns=["1 bits", "2 bits", "3 bits"])
    return table.assign(mean_bits=2.0)


def _counts_frame() -> pd.DataFrame:
    return pd.DataFrame({"layer": np.repeat([f"l{i}" for i in range(6)], 16), "bits": RNG.integers(1, 4, 96),
                         "class count": RNG.integers(0, 11, 96)})


def _errors() -> pd.DataFrame:
    return pd.DataFrame([{"layer": f"layer{l}", "bits": b, "config": c, "relative_error": 2.0 ** -b * (1 + l / 10)}
                         for l in range(18) for b in (2, 4, 8) for c in ("per tensor", "per channel", "per block 4x4")])


CASES = {
    "learning_curve": lambda: plots.learning_curve(_history(), label_smoothing=0.1),
    "per_class_bars": lambda: plots.per_class_bars(CLASSES, RNG.uniform(0.6, 0.95, 10)),
    "accuracy_vs_bits": lambda: plots.accuracy_vs_bits(
        pd.DataFrame([{"bits": b, "config": c, "accuracy": 0.5 + b / 20} for b in (2, 4, 8)
                      for c in ("per tensor", "per channel", "per channel, MSE scales")]), 0.9),
    "error_per_layer": lambda: plots.error_per_layer(_errors()),
    "score_heatmaps": lambda: plots.score_heatmaps({f"layer{i}": RNG.random((10, 16)) for i in range(19)}, CLASSES,
                                                   full_precision=["layer0"], colorbar_label="fraction of images"),
    "class_count_boxes": lambda: plots.class_count_boxes(
        pd.DataFrame({"layer": np.repeat([f"layer{i}" for i in range(18)], 20), "class count": RNG.integers(0, 11, 360),
                      "aggregate": np.tile(["position", "image"], 180)}), 10),
    "scores_vs_depth": lambda: plots.scores_vs_depth(pd.DataFrame({"depth": range(18), "mean_score": np.linspace(0.9, 0.2, 18),
                                                                    "universal": 0.3, "dead": 0.1})),
    "path_overlap": lambda: plots.path_overlap(pd.DataFrame({"layer": [f"layer{i}.conv" for i in range(18)],
                                                              "mean_jaccard": 0.5, "unimportant_share": 0.2})),
    "similarity_heatmaps": lambda: plots.similarity_heatmaps(0.8 + 0.1 * RNG.random((10, 10)), RNG.random((10, 10)), CLASSES),
    "order_vs_accuracy": lambda: plots.order_vs_accuracy(pd.DataFrame({"class": CLASSES, "total similarity": np.linspace(8, 6, 10),
                                                                        "val accuracy (%)": RNG.uniform(70, 95, 10)})),
    "search_trajectory": lambda: plots.search_trajectory(_trajectory()),
    "bits_per_layer_bars": lambda: plots.bits_per_layer_bars(_bits_table()),
    "bits_per_class": lambda: plots.bits_per_class(pd.DataFrame({"class": CLASSES + ["unimportant"], "bits": RNG.integers(1, 5, 11)})),
    "bits_vs_class_count": lambda: plots.bits_vs_class_count(_counts_frame()),
    "refinement_curves": lambda: plots.refinement_curves({"classpath": _history(), "uniform": _history()}),
    "per_class_change": lambda: plots.per_class_change(CLASSES, RNG.uniform(0.3, 0.6, 10), RNG.uniform(0.6, 0.9, 10)),
    "comparison": lambda: plots.comparison(_comparison_table(), "average_bits"),
    "comparison_bitops": lambda: plots.comparison(_comparison_table(), "bitops", log_x=True),
    "comparison_bitops_narrow": lambda: plots.comparison(_comparison_table().assign(
        bitops=lambda t: 1.2e7 + 1e5 * np.arange(len(t))), "bitops", log_x=True),
    "before_after": lambda: plots.before_after(_runs()),
    "accuracy_vs_granularity": lambda: plots.accuracy_vs_granularity(_ptqsl(), 0.9),
    "accuracy_vs_granularity_seeds": lambda: plots.accuracy_vs_granularity(
        pd.concat([_ptqsl().assign(seed=s, val_accuracy=lambda f: f["val_accuracy"] + 0.01 * s) for s in range(3)]), 0.9),
    "reordering_contrasts": lambda: plots.reordering_contrasts(_contrasts()),
    "pipeline_accuracy": lambda: plots.pipeline_accuracy(_stages()),
    "memory_vs_size": lambda: plots.memory_vs_size(pd.DataFrame({
        "images": [600, 6000, 600, 6000], "peak_rss_mb": [690.0, 700.0, 720.0, 1310.0],
        "path": ["read lazily (Dataset)", "read lazily (Dataset)", "decoded in memory", "decoded in memory"]})),
    "mixture_histogram": lambda: plots.mixture_histogram(np.concatenate([RNG.normal(-0.1, 0.02, 500), RNG.normal(0.1, 0.02, 500)]),
                                                         [-0.1, 0.1], [0.02, 0.02], [0.5, 0.5], np.array([-0.125, -0.0625, 0.0625, 0.125])),
    "compression_bars": lambda: plots.compression_bars(
        pd.DataFrame([{"method": m, "coder": c, "layer": "total", "ratio": r} for m, r in (("focused", 14.0), ("deep compression", 12.0))
                      for c in ("huffman", "ans", "zstd")]), {"focused": 0.87, "deep compression": 0.875}),
}


def _figure_functions() -> set[str]:
    return {name for name, function in inspect.getmembers(plots, inspect.isfunction)
            if not name.startswith("_") and function.__module__ == plots.__name__ and inspect.signature(function).return_annotation in ("plt.Figure", plt.Figure)}


def test_every_figure_function_has_a_case():
    covered = {key.split("_bitops")[0] for key in CASES}
    assert _figure_functions() <= covered, _figure_functions() - covered


def _texts(fig: plt.Figure) -> list[Text]:
    return [t for t in fig.findobj(Text) if t.get_visible() and t.get_text().strip()]


def _labels(fig: plt.Figure) -> list[Text]:
    labels = []
    for ax in fig.axes:
        labels += [ax.xaxis.label, ax.yaxis.label, ax.title]
        labels += list(ax.get_xticklabels()) + list(ax.get_yticklabels())
    labels += [t for t in (fig._suptitle,) if t is not None]
    return [t for t in labels if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("case", sorted(CASES))
def test_figure_is_print_sized_and_legible(case):
    fig = CASES[case]()
    try:
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png")  # draws with the layout engine, as save_figure does
        width, height = fig.get_size_inches()
        assert round(width, 2) in (plots.SINGLE_COLUMN, plots.FULL_WIDTH), (case, width)
        assert 1.0 <= height <= 9.0, (case, height)
        renderer = fig.canvas.get_renderer()
        sizes = {round(t.get_fontsize(), 1) for t in _texts(fig)}
        assert sizes and min(sizes) >= 7 and max(sizes) <= 9, (case, sorted(sizes))
        for ax in fig.axes:  # tick labels do not run into one another
            for ticks in (ax.get_xticklabels(), ax.get_yticklabels()):
                # boxes of slanted labels overlap while their glyphs do not: upright ones only
                boxes = [t.get_window_extent(renderer) for t in ticks
                         if t.get_visible() and t.get_text().strip() and t.get_rotation() % 90 == 0]
                for one, two in zip(boxes, boxes[1:]):
                    assert not one.overlaps(two), (case, "tick labels collide", [t.get_text() for t in ticks])
        figure_box = fig.bbox
        legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend() is not None]
        for legend in legends:
            box = legend.get_window_extent(renderer)
            assert box.x0 >= figure_box.x0 - 1 and box.x1 <= figure_box.x1 + 1 and box.y0 >= -1 and box.y1 <= figure_box.y1 + 1, \
                (case, "legend outside the figure")
            for label in _labels(fig):
                assert not box.overlaps(label.get_window_extent(renderer)), (case, "legend covers", label.get_text())
    finally:
        plt.close(fig)


def test_single_and_full_widths_only():
    with pytest.raises(ValueError, match="'half'.*full.*single"):
        plots.new_figure("half")


def test_palette_has_no_two_reds_or_oranges():
    """Hue in degrees: no two colours of the palette in the red-orange band (0-45) within 30 degrees."""
    import colorsys

    from matplotlib.colors import to_rgb

    hues = [360 * colorsys.rgb_to_hsv(*to_rgb(c))[0] for c in plots.PALETTE[:6]]
    warm = sorted(h % 360 for h in hues if h % 360 <= 45 or h >= 345)
    assert len(warm) <= 1, warm


def test_readable_names_for_every_allocator():
    from cpq_lib.config import ALLOCATOR_NAMES

    for allocator in ALLOCATOR_NAMES:
        assert plots.name(allocator) != allocator or "_" not in allocator, allocator
    assert plots.name("test_after") == "test top-1 after refinement (%)"


def test_figures_are_written_in_both_formats_byte_stable(tmp_path):
    fig = plots.learning_curve(_history(), "title")
    first = plots.save_figure(fig, tmp_path / "a", "curve")
    second = plots.save_figure(fig, tmp_path / "b", "curve")
    assert [p.suffix for p in first] == [".png", ".pdf"]
    for one, two in zip(first, second):
        assert one.read_bytes() == two.read_bytes() and one.stat().st_size > 1000
    plt.close(fig)


def test_saved_size_is_the_print_size(tmp_path):
    """savefig's bbox stays "standard": a PNG at 200 dpi of a 3.3 in figure is 660 pixels wide."""
    from PIL import Image

    fig = plots.per_class_bars(CLASSES, RNG.uniform(0.6, 0.95, 10))
    png, _ = plots.save_figure(fig, tmp_path, "bars")
    plt.close(fig)
    with Image.open(png) as image:
        assert image.size[0] == round(plots.SINGLE_COLUMN * 200)


def test_per_class_bars_sorts_worst_first():
    fig = plots.per_class_bars(["a", "b", "c"], [0.9, 0.5, 0.7])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["b", "c", "a"]
    plt.close(fig)


def test_learning_curve_labels_the_smoothed_training_loss():
    fig = plots.learning_curve(_history(2), label_smoothing=0.1)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["train (label smoothing 0.1)", "validation (plain cross-entropy)"]
    plt.close(fig)


def test_score_heatmaps_have_a_colour_bar_axis_labels_and_no_grid():
    fig = plots.score_heatmaps({"a": RNG.random((3, 5)), "b": np.zeros((3, 2))}, ["x", "y", "z"], colorbar_label="fraction of images")
    assert fig.axes[-1].get_ylabel() == "fraction of images"  # the colour bar
    assert fig.axes[0].get_ylabel() == "class" and "channel" in fig.axes[0].get_xlabel()
    assert not any(line.get_visible() for line in fig.axes[0].get_xgridlines() + fig.axes[0].get_ygridlines())
    plt.close(fig)


def test_similarity_colour_range_is_the_off_diagonal():
    jaccard = np.full((4, 4), 0.85)
    jaccard[0, 1] = jaccard[1, 0] = 0.80
    jaccard[2, 3] = jaccard[3, 2] = 0.90
    np.fill_diagonal(jaccard, 1.0)
    fig = plots.similarity_heatmaps(jaccard, np.eye(4) * 0.5 + 0.2, list("abcd"))
    mesh = fig.axes[0].collections[0]
    assert mesh.norm.vmin == pytest.approx(0.80) and mesh.norm.vmax == pytest.approx(0.90)
    plt.close(fig)


def test_lines_by_group_differ_in_marker_and_dash_and_dodge():
    frame = pd.DataFrame({"bits": [2, 3, 2, 3], "acc": [1, 2, 1, 2], "config": ["a", "a", "b", "b"]})
    fig, axes = plots.new_figure()
    ax = axes[0, 0]
    plots.lines_by_group(frame, "bits", "acc", "config", ax, dodge=0.1)
    lines = ax.get_lines()
    assert len({line.get_marker() for line in lines}) == 2 and len({str(line.get_linestyle()) for line in lines}) == 2
    assert list(lines[0].get_xdata()) != list(lines[1].get_xdata())  # equal values stay visible
    plt.close(fig)


def test_pipeline_accuracy_does_not_join_the_baseline():
    fig = plots.pipeline_accuracy(_stages())
    ax = fig.axes[0]
    (line,) = [l for l in ax.get_lines() if len(l.get_xdata()) > 1]
    assert len(line.get_xdata()) == len(_stages()) - 1  # the Deep Compression point stands alone
    plt.close(fig)


def test_comparison_draws_the_confidence_interval():
    table = _comparison_table()
    fig = plots.comparison(table, "average_bits")
    ax = fig.axes[0]
    bars = [c for c in ax.collections if c.__class__.__name__ == "LineCollection"]
    segments = np.concatenate([np.asarray(c.get_segments()) for c in bars])
    spans = np.round(segments[:, 1, 1] - segments[:, 0, 1], 6)
    assert set(spans) == {2.0}  # ci_high - ci_low = 0.02, in points
    assert "GBitOPs" in plots.comparison(table, "bitops").axes[0].get_xlabel()
    plt.close("all")


def test_heatmaps_draw_no_grid_lines():
    fig = plots.similarity_heatmaps(0.8 + 0.1 * RNG.random((4, 4)), RNG.random((4, 4)), list("abcd"))
    for ax in fig.axes[:2]:
        assert not any(line.get_visible() for line in ax.get_xgridlines() + ax.get_ygridlines())
    plt.close(fig)


def test_granularity_lines_are_means_over_seeds():
    seeds = pd.concat([_ptqsl().assign(seed=s, val_accuracy=lambda f, s=s: f["val_accuracy"] + 0.01 * s) for s in range(3)])
    fig = plots.accuracy_vs_granularity(seeds)
    try:
        line = fig.axes[0].get_lines()[0]  # W4A8, the first variant: one point per layout, seeds averaged (+0.01 on average)
        expected = 100 * (_ptqsl().query("target == 'W4A8' and reorder == 'none' and not search")["val_accuracy"] + 0.01)
        assert list(line.get_xdata()) == [0, 1, 2, 3]  # the layouts in order of their scales
        assert [t.get_text() for t in fig.axes[0].get_xticklabels()] == ["layer (18)", "4x1 (72)", "channel (672)", "16x4 (2000)"]
        assert np.allclose(line.get_ydata(), expected.to_numpy())
    finally:
        plt.close(fig)


def test_contrast_bars_span_their_intervals():
    fig = plots.reordering_contrasts(_contrasts())
    try:
        assert [ax.get_title() for ax in fig.axes[:4]] == ["W4A4, no search", "W4A4, scale search", "W3A4, no search", "W3A4, scale search"]
        container = fig.axes[0].containers[0]  # permute, W4A4 without search: differences 0, 0.5, 1, 1.5; CI -0.4 / +0.6
        segments = container.lines[2][0].get_segments()
        assert [tuple(np.round(s[:, 1], 6)) for s in segments] == [(-0.4, 0.6), (0.1, 1.1), (0.6, 1.6), (1.1, 2.1)]
    finally:
        plt.close(fig)
