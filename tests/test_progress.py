import os
import subprocess
import sys

import pytest

from cpq_lib.progress import progress


@pytest.mark.parametrize("value", ["1", "true", "yes"])
def test_tqdm_disable_environment_switches_bars_off(monkeypatch, value):
    monkeypatch.setenv("TQDM_DISABLE", value)
    bar = progress(range(3))
    assert bar.disable is True  # read before iterating: tqdm sets it when the bar closes
    assert list(bar) == [0, 1, 2]


def test_bars_shown_without_tqdm_disable():
    # tqdm reads TQDM_DISABLE when it is imported (the test session sets it), so check in a fresh process
    env = {k: v for k, v in os.environ.items() if k != "TQDM_DISABLE"}
    code = "from cpq_lib.progress import progress; print(progress(range(3)).disable)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "False"


def test_enabled_false_always_switches_off(monkeypatch):
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    assert progress(range(2), enabled=False).disable is True
