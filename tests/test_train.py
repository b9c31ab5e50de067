import copy
import dataclasses
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from cpq_lib.config import make_config
from cpq_lib.data.sources import ImageTensors
from cpq_lib.data import TensorBatchLoader
from cpq_lib.errors import CheckpointError
from cpq_lib.models import build_model, read_checkpoint
from cpq_lib.quant import QuantConfig, calibrate_, quantize_
from cpq_lib.train import evaluate, learning_rate, train_model


def test_onecycle_rises_then_anneals():
    lrs = [learning_rate(s, 100, 0.1, "onecycle") for s in range(100)]
    assert lrs[0] == pytest.approx(0.004) and max(lrs) == pytest.approx(0.1)
    assert lrs.index(max(lrs)) == 15 and lrs[-1] < 1e-3
    assert all(a <= b for a, b in zip(lrs[:15], lrs[1:16])) and all(a >= b for a, b in zip(lrs[15:], lrs[16:]))


def test_cosine_step_constant():
    assert learning_rate(0, 100, 0.2, "cosine") == pytest.approx(0.2)
    assert learning_rate(50, 100, 0.2, "cosine") == pytest.approx(0.1)
    assert learning_rate(0, 100, 0.2, "cosine", warmup_steps=10) == pytest.approx(0.02)
    assert [learning_rate(s, 100, 1.0, "step") for s in (0, 50, 80)] == pytest.approx([1.0, 0.1, 0.01])
    assert learning_rate(99, 100, 0.3, "constant") == 0.3
    with pytest.raises(ValueError, match="unknown schedule 'linear'"):
        learning_rate(0, 10, 0.1, "linear")


class Always(nn.Module):
    def __init__(self, label: int, classes: int) -> None:
        super().__init__()
        self.label, self.classes = label, classes

    def forward(self, x):
        logits = torch.zeros(x.shape[0], self.classes)
        logits[:, self.label] = 1.0
        return logits


def test_evaluate_per_class_accuracy_and_loss():
    data = ImageTensors(torch.zeros(6, 1, 2, 2, dtype=torch.uint8), torch.tensor([0, 0, 0, 1, 2, 2]))
    result = evaluate(Always(0, 3), TensorBatchLoader(data, 4), num_classes=3)
    assert result.accuracy == pytest.approx(0.5) and result.per_class_accuracy == [1.0, 0.0, 0.0]
    expected_loss = -math.log(math.e / (math.e + 2))
    assert result.count == 6 and result.per_class_count == [3, 1, 2]
    assert result.loss == pytest.approx((3 * expected_loss + 3 * -math.log(1 / (math.e + 2))) / 6)
    with pytest.raises(ValueError, match="class count mismatch"):
        evaluate(Always(0, 3), TensorBatchLoader(data, 4), num_classes=4)


def test_training_learns_digits(digits):
    config = make_config("quick", {"train.epochs": 8})
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1)
    result = train_model(model, digits, config.train, seed=0, progress=False)
    assert len(result.history) == 8 and result.history[-1]["val_accuracy"] > 0.9
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]


def test_resume_refuses_other_settings_and_corrupted_state(digits, tmp_path):
    config = make_config("quick", {"train.epochs": 2})
    model = build_model("digits_cnn", 10, in_channels=1)
    state = tmp_path / "state.pt"
    train_model(model, digits, config.train, seed=0, state_path=state, progress=False)
    with pytest.raises(CheckpointError, match="different seed"):
        train_model(model, digits, config.train, seed=1, state_path=state, progress=False)
    other = make_config("quick", {"train.epochs": 2, "train.lr": 0.01})
    with pytest.raises(CheckpointError, match="different train_config"):
        train_model(model, digits, other.train, seed=0, state_path=state, progress=False)
    state.write_bytes(state.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="corrupted"):
        train_model(model, digits, config.train, seed=0, state_path=state, progress=False)


# --- resume after SIGKILL: real subprocesses, compared bit for bit with an uninterrupted run ----------

DRIVER = textwrap.dedent('''
    import os, signal, sys
    import torch
    import cpq_lib.train.trainer as trainer
    from cpq_lib.fileio import atomic_path
    from cpq_lib.train.__main__ import main

    mode, kill_epoch = sys.argv[1], int(sys.argv[2])
    real_save = trainer.atomic_torch_save

    def killing_save(payload, path):
        if payload["epoch"] != kill_epoch:
            return real_save(payload, path)
        if mode == "after-epoch":
            real_save(payload, path)
            os.kill(os.getpid(), signal.SIGKILL)
        with atomic_path(path) as tmp:  # "during-write": die with a half-written temporary file
            torch.save(payload, tmp)
            tmp.write_bytes(tmp.read_bytes()[: tmp.stat().st_size // 2])
            os.kill(os.getpid(), signal.SIGKILL)

    trainer.atomic_torch_save = killing_save
    main(sys.argv[3:])
''')

EPOCHS = 5


def _cli(out: Path) -> list[str]:
    return ["--profile", "quick", "--out", str(out), "--set", f"train.epochs={EPOCHS}", "--no-progress"]


def _run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("uninterrupted")
    done = _run(["-m", "cpq_lib.train", *_cli(out)], out)
    assert done.returncode == 0, done.stderr
    return read_checkpoint(out / "model.pt")["state_dict"]


@pytest.mark.slow
@pytest.mark.parametrize("mode,kill_epoch", [("after-epoch", 2), ("during-write", 3)])
def test_killed_training_resumes_to_identical_weights(tmp_path, uninterrupted, mode, kill_epoch):
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER, encoding="utf-8")
    out = tmp_path / "run"
    killed = _run([str(driver), mode, str(kill_epoch), *_cli(out)], tmp_path)
    assert killed.returncode == -9, killed.stderr
    assert not (out / "model.pt").exists()
    state = torch.load(out / "state.pt", weights_only=True)
    assert state["epoch"] == (kill_epoch if mode == "after-epoch" else kill_epoch - 1)
    if mode == "during-write":
        assert list(out.glob(".state.pt.*.tmp")), "the half-written temporary file should be left beside state.pt"
    resumed = _run(["-m", "cpq_lib.train", *_cli(out)], tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    final = read_checkpoint(out / "model.pt")
    assert final["card"]["epochs"] == EPOCHS and len(final["card"]["history"]) == EPOCHS
    assert final["state_dict"].keys() == uninterrupted.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(final["state_dict"][key], value), f"{key} differs after resuming"


class TurnsNaN(nn.Module):
    """A small classifier whose output becomes NaN from the ``after``-th training call on (as when it diverges)."""

    def __init__(self, after):
        super().__init__()
        self.net = build_model("digits_cnn", 10, in_channels=1)
        self.after, self.calls = after, 0

    def forward(self, x):
        out = self.net(x)
        if self.training:
            self.calls += 1
            if self.calls >= self.after:
                out = out * float("nan")
        return out


def test_diverging_training_stops_with_a_clear_error_and_keeps_the_last_good_state(digits, tmp_path):
    from cpq_lib.errors import TrainingError

    config = make_config("quick", {"train.epochs": 3})
    torch.manual_seed(0)
    model = TurnsNaN(after=len(digits.train_loader(config.train.batch_size, 0)) + 3)  # epoch 2, step 3
    with pytest.raises(TrainingError, match="training loss is nan at epoch 2, step 3.*lower the learning rate"):
        train_model(model, digits, config.train, seed=0, state_path=tmp_path / "state.pt", progress=False)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_cli_prints_input_errors_without_a_traceback(tmp_path):
    bad = _run(["-m", "cpq_lib.train", "--profile", "quick", "--out", str(tmp_path / "o"), "--set", "train.lr=NaN"], tmp_path)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    assert "error: train.lr: expected a finite number, got nan" in bad.stderr
    missing = _run(["-m", "cpq_lib.train", "--profile", "cifar10", "--data-root", str(tmp_path / "none.zip"),
                    "--out", str(tmp_path / "o")], tmp_path)
    assert missing.returncode == 2 and "Traceback" not in missing.stderr and "does not exist" in missing.stderr
    (tmp_path / "afile").write_text("x")
    as_file = _run(["-m", "cpq_lib.train", "--out", str(tmp_path / "afile")], tmp_path)
    assert as_file.returncode == 2 and "is a file; give a folder" in as_file.stderr


class StopAfterFirstEpoch(Exception):
    pass


@pytest.mark.slow
def test_compiled_training_resumes_exactly_and_stays_close_to_eager(digits, tmp_path):
    """train.compile=on (on the CPU: inductor's default mode): a run interrupted after its first epoch
    and resumed from its state equals the uninterrupted compiled run bit for bit; the compiled step
    computes what the eager one does up to rounding."""
    from torch._dynamo.utils import counters

    def fresh():
        torch.manual_seed(0)
        return build_model("digits_cnn", 10, in_channels=1)

    compiled_cfg = make_config("quick", {"train.epochs": 2, "train.compile": "on"}).train
    graphs_before = counters["stats"]["unique_graphs"]
    full = fresh()
    full_result = train_model(full, digits, compiled_cfg, seed=0, progress=False)
    assert counters["stats"]["unique_graphs"] > graphs_before  # the step really was compiled

    def stop(record):
        if record["epoch"] == 1:
            raise StopAfterFirstEpoch

    with pytest.raises(StopAfterFirstEpoch):
        train_model(fresh(), digits, compiled_cfg, seed=0, progress=False, state_path=tmp_path / "state.pt", on_epoch=stop)
    resumed = fresh()
    resumed_result = train_model(resumed, digits, compiled_cfg, seed=0, progress=False, state_path=tmp_path / "state.pt")
    assert resumed_result.resumed_from_epoch == 1
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), f"{key} differs after resuming"
    strip = lambda history: [{k: v for k, v in r.items() if k != "seconds"} for r in history]  # noqa: E731
    assert strip(resumed_result.history) == strip(full_result.history)

    eager = fresh()
    eager_result = train_model(eager, digits, make_config("quick", {"train.epochs": 2, "train.compile": "off"}).train,
                               seed=0, progress=False)
    assert abs(eager_result.history[-1]["val_accuracy"] - full_result.history[-1]["val_accuracy"]) < 0.03
    assert abs(eager_result.history[0]["train_loss"] - full_result.history[0]["train_loss"]) < 1e-3


def test_auto_compile_decision():
    from cpq_lib.train.trainer import CPU_COMPILE_MIN_STEPS, compile_mode

    cfg = make_config("quick").train
    assert cfg.compile == "auto"
    torch.manual_seed(0)
    float32 = build_model("digits_cnn", 10, in_channels=1)
    float64 = build_model("digits_cnn", 10, in_channels=1).double()
    long, short = CPU_COMPILE_MIN_STEPS, CPU_COMPILE_MIN_STEPS - 1
    assert compile_mode(cfg, "cpu", float32, long) == "default"
    assert compile_mode(cfg, "cpu", float32, short) is None
    assert compile_mode(cfg, "cpu", float64, long) is None  # the quick profile's float64 runs stay eager
    assert compile_mode(cfg, "cuda", float64, 1) == "reduce-overhead"
    quantized = quantize_(build_model("digits_cnn", 10, in_channels=1), QuantConfig(4, 4))
    assert compile_mode(cfg, "cuda", quantized, 1) == "reduce-overhead"  # quantized students compile too
    on, off = (dataclasses.replace(cfg, compile=value) for value in ("on", "off"))
    assert compile_mode(on, "cpu", float64, 1) == "default" and compile_mode(off, "cuda", float32, long) is None


@pytest.mark.parametrize("learnable", [False, True])
def test_qat_kd_step_traces_as_one_graph(learnable):
    """The refinement step (teacher, quantized student, distillation loss) has no graph break: the
    quantizers read no state back from tensors, so torch.compile sees the whole step."""
    from cpq_lib.train import Distillation
    from cpq_lib.train.trainer import compiled_step

    torch.manual_seed(0)
    teacher = build_model("resnet20", 10).eval()
    student = quantize_(copy.deepcopy(teacher), QuantConfig(weight_bits=3, act_bits=4, learnable_scales=learnable))
    images, labels = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    calibrate_(student, [(images, labels)])
    step = compiled_step(Distillation(teacher), student.train(), None)
    explanation = torch._dynamo.explain(step)(images, labels)
    assert explanation.graph_break_count == 0, [reason.reason for reason in explanation.break_reasons]
    assert explanation.graph_count == 1 and explanation.op_count > 100
    assert len(list(explanation.graphs[0].graph.nodes)) > 100  # the quantized layers are in the graph


def test_auto_compile_falls_back_to_eager_when_compiling_fails(monkeypatch):
    from cpq_lib.train.trainer import compiled_step

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise RuntimeError("InductorError: no working C++ compiler found")
        return call

    monkeypatch.setattr(torch, "compile", broken_compile)
    torch.manual_seed(0)
    model = build_model("digits_cnn", 10, in_channels=1)
    images, labels = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    objective = lambda m, x, y: (torch.nn.functional.cross_entropy(m(x), y), m(x))  # noqa: E731
    step = compiled_step(objective, model, "default", fallback=True)
    with pytest.warns(UserWarning, match="compiling the training step failed.*no working C"):
        loss, _ = step(images, labels)
    assert torch.equal(loss, objective(model, images, labels)[0])
    strict = compiled_step(objective, model, "default")
    with pytest.raises(RuntimeError, match="no working C"):
        strict(images, labels)
