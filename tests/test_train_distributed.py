"""Training on 2 ranks (torchrun, gloo on the CPU) against one process on the same global batches."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from cpq_lib.config import TrainConfig
from cpq_lib.errors import TrainingError
from cpq_lib.models import read_checkpoint
from cpq_lib.train.distributed import from_sync_batchnorm_, to_sync_batchnorm, world

# a BatchNorm-free network: with BatchNorm each rank normalises with its own piece's statistics (torch's
# SyncBatchNorm, which would make them global, runs on GPUs only), so only such a network trains
# identically on 2 CPU ranks and in 1 process; the data, crops, flips and gradient averaging are what is checked
EQUALITY = textwrap.dedent('''
    import sys
    import torch
    from torch import nn
    from cpq_lib.config import TrainConfig
    from cpq_lib.data import load_dataset
    from cpq_lib.train import train_model
    from cpq_lib.train.distributed import init_from_environment, is_writer

    torch.set_default_dtype(torch.float64)
    torch.set_num_threads(1)
    init_from_environment("cpu")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 16, 3, stride=2), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 10))
    data = load_dataset("digits")  # 1,293 training images: the last global batch of 100 is short (93)
    config = TrainConfig(epochs=2, batch_size=100, lr=0.05, schedule="cosine", channels_last=False, compile="off")
    seen = []  # the training images this rank's forward passes saw
    model.register_forward_pre_hook(lambda module, args: seen.append(args[0].shape[0]) if module.training else None)
    result = train_model(model, data, config, seed=3, progress=False)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    with open(f"{sys.argv[1]}.rank{rank}", "w") as handle:
        handle.write(" ".join(map(str, seen)))
    if is_writer():
        torch.save({"state": model.state_dict(), "history": result.history}, sys.argv[1])
''')


def _run(args: list[str], cwd: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _torchrun(ranks: int) -> list[str]:
    return ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}"]


def test_two_ranks_train_as_one_process_on_the_same_global_batches(tmp_path):
    script = tmp_path / "train.py"
    script.write_text(EQUALITY, encoding="utf-8")
    single = _run([str(script), str(tmp_path / "one.pt")], tmp_path)
    assert single.returncode == 0, single.stderr
    double = _run([*_torchrun(2), str(script), str(tmp_path / "two.pt")], tmp_path)
    assert double.returncode == 0, double.stderr[-3000:]
    one, two = (torch.load(tmp_path / f"{name}.pt", weights_only=True) for name in ("one", "two"))
    pieces = [[int(n) for n in (tmp_path / f"two.pt.rank{rank}").read_text().split()] for rank in (0, 1)]
    batches = [100] * 12 + [93]  # the single process's global batches, per epoch
    assert [int(n) for n in (tmp_path / "one.pt.rank0").read_text().split()] == batches * 2
    assert pieces == [[50] * 12 + [47] + [50] * 12 + [47], [50] * 12 + [46] + [50] * 12 + [46]]  # each rank its half
    for key, value in one["state"].items():
        torch.testing.assert_close(two["state"][key], value, rtol=1e-9, atol=1e-12, msg=key)
    assert not torch.equal(one["state"]["0.weight"], torch.zeros_like(one["state"]["0.weight"]))
    for a, b in zip(one["history"], two["history"]):  # epoch statistics summed over both ranks' pieces
        assert a["train_accuracy"] == b["train_accuracy"] and a["val_accuracy"] == b["val_accuracy"]
        assert a["train_loss"] == pytest.approx(b["train_loss"], rel=1e-9)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-9)


KILLING = textwrap.dedent('''
    import os, signal, sys
    import cpq_lib.train.trainer as trainer
    from cpq_lib.train.__main__ import main

    kill_epoch = int(sys.argv[1])
    real_save = trainer.atomic_torch_save

    def killing_save(payload, path):
        real_save(payload, path)
        if payload["epoch"] == kill_epoch:  # rank 0 dies after saving; torchrun stops the other rank
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.atomic_torch_save = killing_save
    main(sys.argv[2:])
''')


@pytest.mark.slow
def test_the_cli_under_torchrun_writes_once_and_resumes_after_a_kill(tmp_path):
    cli = ["--profile", "quick", "--set", "train.epochs=3", "--set", "train.batch_size=128", "--no-progress"]
    whole = _run([*_torchrun(2), "-m", "cpq_lib.train", "--out", str(tmp_path / "whole"), *cli], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert whole.stdout.count('"epochs": 3') == 1  # one rank reports
    driver = tmp_path / "driver.py"
    driver.write_text(KILLING, encoding="utf-8")
    out = tmp_path / "killed"
    killed = _run([*_torchrun(2), str(driver), "2", "--out", str(out), *cli], tmp_path)
    assert killed.returncode != 0 and not (out / "model.pt").exists()
    assert torch.load(out / "state.pt", weights_only=True)["epoch"] == 2
    resumed = _run([*_torchrun(2), "-m", "cpq_lib.train", "--out", str(out), *cli], tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, final = read_checkpoint(tmp_path / "whole" / "model.pt"), read_checkpoint(out / "model.pt")
    assert [h["epoch"] for h in final["card"]["history"]] == [1, 2, 3]
    for key, value in expected["state_dict"].items():
        assert torch.equal(final["state_dict"][key], value), f"{key} differs after resuming"


def test_sync_batchnorm_is_refused_on_the_cpu_and_converts_back():
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), torch.nn.BatchNorm2d(4))
    with pytest.raises(TrainingError, match="sync_bn needs CUDA"):
        to_sync_batchnorm(model, "cpu")
    model[1].running_mean.fill_(0.5)
    synced = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    assert isinstance(synced[1], torch.nn.SyncBatchNorm)
    back = from_sync_batchnorm_(synced)
    assert type(back[1]) is torch.nn.BatchNorm2d and torch.equal(back[1].running_mean, torch.full((4,), 0.5))
    assert world() == (0, 1) and TrainConfig().sync_bn is False
