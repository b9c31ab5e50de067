import pytest

from cpq_lib.progress import progress


@pytest.mark.parametrize("value,disabled", [("1", True), ("true", True), ("0", False), ("", False)])
def test_tqdm_disable_environment_switches_bars_off(monkeypatch, value, disabled):
    monkeypatch.setenv("TQDM_DISABLE", value)
    bar = progress(range(3))
    assert bar.disable is disabled  # read before iterating: tqdm sets it when the bar closes
    assert list(bar) == [0, 1, 2]


def test_enabled_false_always_switches_off(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress(range(2), enabled=False).disable is True
