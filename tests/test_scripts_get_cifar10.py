"""scripts/get_cifar10.py asks torchvision for both parts with download=True and reports failures."""

import importlib.util
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parent.parent / "scripts" / "get_cifar10.py"


def _load():
    spec = importlib.util.spec_from_file_location("get_cifar10", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_downloads_train_and_test(tmp_path, monkeypatch, capsys):
    from torchvision import datasets

    calls = []
    monkeypatch.setattr(datasets, "CIFAR10", lambda root, train, download: calls.append((root, train, download)))
    assert _load().main([str(tmp_path / "c10")]) == 0
    assert calls == [(str(tmp_path / "c10"), True, True), (str(tmp_path / "c10"), False, True)]
    assert f"--data-root {tmp_path / 'c10'}" in capsys.readouterr().out


def test_a_failed_download_is_one_clear_line(tmp_path, monkeypatch, capsys):
    from torchvision import datasets

    def offline(root, train, download):
        raise RuntimeError("<urlopen error [Errno -3] Temporary failure in name resolution>")

    monkeypatch.setattr(datasets, "CIFAR100", offline)
    assert _load().main([str(tmp_path), "--name", "cifar100"]) == 1
    assert "downloading cifar100 into" in capsys.readouterr().err


def test_unknown_data_set_is_refused():
    with pytest.raises(SystemExit):
        _load().main(["x", "--name", "imagenet"])
