import matplotlib.pyplot as plt

from cpq_lib.plots import learning_curve, per_class_bars, save_figure


def test_figures_are_written_in_both_formats_byte_stable(tmp_path):
    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5, "val_accuracy": 0.4}
               for e in range(1, 5)]
    fig = learning_curve(history, "title")
    first = save_figure(fig, tmp_path / "a", "curve")
    second = save_figure(fig, tmp_path / "b", "curve")
    assert [p.suffix for p in first] == [".png", ".pdf"]
    for one, two in zip(first, second):
        assert one.read_bytes() == two.read_bytes() and one.stat().st_size > 1000
    plt.close(fig)


def test_per_class_bars_sorts_worst_first():
    fig = per_class_bars(["a", "b", "c"], [0.9, 0.5, 0.7])
    labels = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert labels == ["b", "c", "a"]
    plt.close(fig)


def test_learning_curve_labels_the_smoothed_training_loss():
    from cpq_lib.plots import learning_curve

    history = [{"epoch": e, "train_loss": 1 / e, "val_loss": 1.2 / e, "train_accuracy": 0.5, "val_accuracy": 0.4} for e in (1, 2)]
    fig = learning_curve(history, label_smoothing=0.1)
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels == ["train (label smoothing 0.1)", "validation (plain cross-entropy)"]
    plt.close(fig)


def test_score_heatmaps_have_a_colour_bar_and_axis_labels():
    import numpy as np

    from cpq_lib.plots import score_heatmaps

    fig = score_heatmaps({"a": np.random.default_rng(0).random((3, 5)), "b": np.zeros((3, 2))}, ["x", "y", "z"], "t",
                         colorbar_label="fraction of images")
    assert fig.axes[-1].get_ylabel() == "fraction of images"  # the colour bar
    assert fig.axes[0].get_ylabel() == "class" and "channel" in fig.axes[0].get_xlabel()
    plt.close(fig)


def test_lines_by_group_differ_in_marker_and_dash():
    import pandas as pd

    from cpq_lib.plots import lines_by_group

    frame = pd.DataFrame({"bits": [2, 3, 2, 3], "acc": [1, 2, 1.5, 2.5], "config": ["a", "a", "b", "b"]})
    fig, ax = plt.subplots()
    lines_by_group(frame, "bits", "acc", "config", ax)
    lines = [line for line in ax.get_lines() if len(line.get_xdata()) == 2]
    assert len({line.get_marker() for line in lines}) == 2 and len({str(line.get_dashes() if hasattr(line, "get_dashes") else line.get_linestyle()) for line in lines}) == 2
    plt.close(fig)
