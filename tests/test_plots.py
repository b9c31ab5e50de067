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
