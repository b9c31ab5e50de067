"""SGD training that checkpoints every epoch atomically and resumes exactly after being killed.

Exact resumption needs no saved RNG state: each epoch's shuffling, augmentation and torch seed are
derived from (seed, epoch), and the learning rate is a pure function of the step.

Nothing in an epoch waits for the device: losses, hit counts and the non-finite-loss check accumulate
on it and are read once per epoch; on CUDA the batches come from images kept on the GPU, the
learning rate is a device tensor filled from the epoch's schedule (fused SGD reads it there), and
the step can run as CUDA graphs (``compile``). A loss that turns non-finite is reported at the end of
its epoch, before anything is saved, so the state on disk is still the last good epoch.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from ..progress import progress as progress_bar

from ..config import TrainConfig
from ..data import DataBundle
from ..devices import check_model_device
from ..errors import CheckpointError, TrainingError
from ..fileio import atomic_torch_save, atomic_write_text
from .distributed import (all_reduce_, barrier, data_parallel, from_sync_batchnorm_, is_writer, to_sync_batchnorm,
                          world)
from .evaluate import evaluate
from .schedule import learning_rate

STATE_FORMAT = "cpq-train-state/1"


@dataclass
class TrainResult:
    history: list[dict] = field(default_factory=list)
    epochs_completed: int = 0
    resumed_from_epoch: int = 0
    seconds: float = 0.0


Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def cross_entropy(label_smoothing: float = 0.0) -> Objective:
    """The default objective: ``(loss, logits)`` of plain (optionally label-smoothed) cross-entropy."""
    criterion = nn.CrossEntropyLoss(label_smoothing=label_smoothing)

    def objective(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        logits = model(images)
        return criterion(logits, labels), logits

    return objective


def make_optimizer(model: nn.Module, cfg: TrainConfig, lr: torch.Tensor | None = None) -> torch.optim.SGD:
    """SGD; learnable quantizer scales get no weight decay (decay would shrink the clipping ranges).

    ``lr``: a one-element CUDA tensor every group reads its learning rate from, with the fused
    implementation (one kernel for all parameters, no host read of the rate); default a float.
    """
    scales = [p for n, p in model.named_parameters() if ".weight_quantizer." in f".{n}" or ".input_quantizer." in f".{n}"]
    ids = {id(p) for p in scales}
    weights = [p for p in model.parameters() if id(p) not in ids]
    groups = [{"params": weights}] + ([{"params": scales, "weight_decay": 0.0}] if scales else [])
    fused = {"fused": True} if lr is not None else {}
    optimizer = torch.optim.SGD(groups, lr=cfg.lr if lr is None else lr, momentum=cfg.momentum,
                                nesterov=cfg.nesterov and cfg.momentum > 0, weight_decay=cfg.weight_decay, **fused)
    _share_lr(optimizer, lr)
    return optimizer


def _share_lr(optimizer: torch.optim.Optimizer, lr: torch.Tensor | None) -> None:
    """Every group reads the one rate tensor (also after ``load_state_dict``, which puts in copies)."""
    if lr is not None:
        for group in optimizer.param_groups:
            group["lr"] = lr


def has_fake_quantizers(model: nn.Module) -> bool:
    return any(hasattr(module, "weight_quantizer") or hasattr(module, "input_quantizer") for module in model.modules())


CPU_COMPILE_MIN_STEPS = 1000
"""``compile="auto"`` compiles a float32 CPU run of at least this many steps. Measured side by side
(``benchmarks/bench_compile.py``, 2 cores, batch 256, empty compile cache): the compiled QAT+KD step
takes 0.78x the eager one (fp32: 0.93x) after a first call of 33 s (fp32: 25 s), so compiling pays
after about 300 QAT+KD steps; the margin covers the validation graph's compile and machines that
gain less."""


def compile_mode(cfg: TrainConfig, device: str | torch.device, model: nn.Module | None = None,
                 steps: int | None = None) -> str | None:
    """The torch.compile mode the config asks for on ``device`` (None: eager).

    "auto": on CUDA always (CUDA graphs; quantized students too, since their quantizers read no device
    state and the QAT+KD step traces as one graph, tested); on the CPU for float32 runs of at least
    :data:`CPU_COMPILE_MIN_STEPS` ``steps`` (short runs, such as the `quick` profile's float64 ones,
    stay eager: compiling would cost more than they run, and changes their last bits). "on" compiles
    anyway, "off" never.
    """
    on_cuda = torch.device(device).type == "cuda"
    if cfg.compile == "off":
        return None
    if cfg.compile == "auto" and not on_cuda:
        float32 = model is not None and all(p.dtype == torch.float32 for p in model.parameters())
        if not (float32 and steps is not None and steps >= CPU_COMPILE_MIN_STEPS):
            return None
    return "reduce-overhead" if on_cuda else "default"


def compiled_step(objective: "Objective", model: nn.Module, mode: str | None, fallback: bool = False):
    """``forward(images, labels) -> (loss, logits)``: the objective with the model, compiled when asked
    (teacher, student and loss in one graph; backward compiled with it). With CUDA graphs the outputs
    live in the graph's memory until the next replay, which is why callers consume them in the step.

    ``fallback``: if compiling fails on the first call (no C++ compiler, an unsupported operator), warn
    and run eager from then on; for ``compile="auto"``, whose user did not ask for compilation."""
    def forward(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return objective(model, images, labels)

    if mode is None:
        return forward
    # each call compiles a new closure; dynamo would count that as a recompile of the same code and,
    # past its cache limit (8), silently run eager: start from clean caches instead
    torch.compiler.reset()
    compiled = torch.compile(forward, mode=mode)
    state = {"step": compiled, "first": True}

    def step(images: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if mode == "reduce-overhead":
            torch.compiler.cudagraph_mark_step_begin()  # a new training step: earlier outputs may be reused
        if not (state["first"] and fallback):
            return state["step"](images, labels)
        state["first"] = False
        try:
            return compiled(images, labels)
        except Exception as exc:  # noqa: BLE001 - any compiler failure: the eager step still trains
            warnings.warn(f"cpq: compiling the training step failed ({type(exc).__name__}: "
                          f"{str(exc).splitlines()[0][:200] if str(exc) else ''}); training eagerly", stacklevel=2)
            state["step"] = forward
            return forward(images, labels)

    return step


def _load_state(path: Path, expected: dict, restart_stale: bool = False) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any failure to read means the file is unusable
        raise CheckpointError(f"training state {path} is corrupted: {exc}; delete it to start over") from exc
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a cpq training state (format {STATE_FORMAT!r})")
    for key, value in expected.items():
        if state.get(key) != value:
            if restart_stale:  # a cache of another run's: start this run over
                return None
            raise CheckpointError(
                f"training state {path} was made with a different {key}: {state.get(key)!r} vs now {value!r}; "
                f"use another state path or delete it"
            )
    return state


def train_model(
    model: nn.Module,
    data: DataBundle,
    cfg: TrainConfig,
    *,
    seed: int,
    device: str = "cpu",
    state_path: str | os.PathLike | None = None,
    log_path: str | os.PathLike | None = None,
    progress: bool = True,
    eval_split: str = "val",
    on_epoch: Callable[[dict], None] | None = None,
    objective: Objective | None = None,
    state_key: dict | None = None,
    restart_stale: bool = False,
) -> TrainResult:
    """Train ``model`` in place for ``cfg.epochs`` epochs (or ``cfg.max_steps`` steps, if the config has
    one), validating on ``eval_split`` after each epoch. The model must already be on ``device``.

    ``objective(model, images, labels) -> (loss, logits)`` defaults to cross-entropy with the config's
    label smoothing (knowledge distillation: :class:`cpq_lib.train.Distillation`). ``state_key``: more
    values a resumed state must have been made with (e.g. the bit plan of a quantized student); a state
    made otherwise is an error, or with ``restart_stale`` (the state is a cache of a keyed stage) ignored
    and overwritten by this run's.

    Under torchrun (a process group of several ranks, :mod:`cpq_lib.train.distributed`) the model is
    trained with DistributedDataParallel: each rank takes its piece of every global batch of
    ``cfg.batch_size``, rank 0 alone writes the state and the log, and every rank resumes from them.
    """
    check_model_device(model, device, "train_model")
    rank, ranks = world()
    writer = is_writer()
    progress = progress and writer
    on_cuda = torch.device(device).type == "cuda"
    fmt = torch.channels_last if cfg.channels_last else torch.contiguous_format
    model.to(memory_format=fmt)
    synced = ranks > 1 and cfg.sync_bn
    if synced:
        to_sync_batchnorm(model, device)
    lr_now = torch.tensor(cfg.lr, dtype=torch.float32, device=device) if on_cuda else None
    optimizer = make_optimizer(model, cfg, lr_now)
    objective = objective or cross_entropy(cfg.label_smoothing)
    loader = data.train_loader(cfg.batch_size, seed=seed, device=device, shard=(rank, ranks))
    eval_loader = data.eval_loader(eval_split, device=device, shard=(rank, ranks))
    train_images = len(data.train)
    steps_per_epoch = len(loader)
    total_steps = cfg.epochs * steps_per_epoch
    max_steps = getattr(cfg, "max_steps", None)
    epochs_to_run = cfg.epochs
    if max_steps is not None:
        total_steps = max_steps
        epochs_to_run = -(-max_steps // steps_per_epoch)
    mode = compile_mode(cfg, device, model, total_steps) if ranks == 1 else None  # DDP steps run eager
    network = data_parallel(model, device) if ranks > 1 else model
    forward = compiled_step(objective, network, mode, fallback=cfg.compile == "auto")
    eval_model = torch.compile(model, mode=mode) if mode is not None else model
    warmup_steps = round(cfg.warmup_epochs * steps_per_epoch)
    expected = {"train_config": dataclasses.asdict(cfg), "seed": seed, "val_digest": data.val_digest,
                "dataset": data.name, **(state_key or {})}
    state_file = Path(state_path) if state_path is not None else None
    result = TrainResult()
    state = _load_state(state_file, expected, restart_stale) if state_file is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        model.to(memory_format=fmt)
        optimizer.load_state_dict(state["optimizer"])
        _share_lr(optimizer, lr_now)
        result.history = list(state["history"])
        result.epochs_completed = result.resumed_from_epoch = int(state["epoch"])
        result.seconds = float(state["seconds"])
        if log_path is not None and writer:  # the log matches the state (a kill may fall between saving and logging)
            atomic_write_text("".join(json.dumps(record) + "\n" for record in result.history), log_path)

    epochs = progress_bar(range(result.epochs_completed, epochs_to_run), progress, desc="epochs",
                          initial=result.epochs_completed, total=epochs_to_run)
    for epoch in epochs:
        started = time.perf_counter()
        torch.manual_seed(seed * 100_003 + epoch)
        loader.set_epoch(epoch)
        model.train()
        first_step = epoch * steps_per_epoch
        steps = max(0, min(steps_per_epoch, total_steps - first_step))
        rates = [learning_rate(first_step + i, total_steps, cfg.lr, cfg.schedule, warmup_steps=warmup_steps,
                               milestones=tuple(cfg.milestones), gamma=cfg.gamma) for i in range(steps)]
        rate_table = torch.tensor(rates, dtype=torch.float32).to(device, non_blocking=True) if on_cuda else None
        # per-epoch sums on the device (float64, as Python floats summed them: the same numbers)
        loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        correct = torch.zeros((), dtype=torch.long, device=device)
        bad_step = torch.full((), -1, dtype=torch.long, device=device)
        bad_loss = torch.zeros((), dtype=torch.float32, device=device)
        seen = 0
        batches = progress_bar(loader, progress, desc=f"epoch {epoch + 1}", leave=False, total=steps)
        for step_in_epoch, (images, labels) in enumerate(batches):
            if step_in_epoch >= steps:  # a step budget ends inside this epoch
                break
            if rate_table is not None:
                lr_now.copy_(rate_table[step_in_epoch])
            else:
                for group in optimizer.param_groups:
                    group["lr"] = rates[step_in_epoch]
            images = images.to(device).contiguous(memory_format=fmt)
            labels = labels.to(device)
            loss, logits = forward(images, labels)
            loss_value = loss.detach()
            if ranks > 1:  # DDP averages the ranks' gradients: weigh each piece's mean by its share of the global batch
                global_count = min(cfg.batch_size, train_images - step_in_epoch * cfg.batch_size)
                loss = loss * (labels.shape[0] * ranks / global_count)
            first_bad = (bad_step < 0) & ~torch.isfinite(loss_value)
            bad_step = torch.where(first_bad, step_in_epoch, bad_step)
            bad_loss = torch.where(first_bad, loss_value, bad_loss)
            loss_sum += loss_value.double() * labels.shape[0]
            correct += (logits.detach().argmax(1) == labels).sum()
            seen += labels.shape[0]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        lr = rates[-1] if rates else learning_rate(first_step, total_steps, cfg.lr, cfg.schedule,
                                                   warmup_steps=warmup_steps, milestones=tuple(cfg.milestones),
                                                   gamma=cfg.gamma)
        if ranks > 1:  # the epoch's sums over every rank's pieces
            seen_total = torch.tensor(seen, dtype=torch.long, device=device)
            for total in (correct, seen_total):
                all_reduce_(total)
            all_reduce_(loss_sum)
            all_reduce_(bad_step, "max")
            seen = int(seen_total)
        if int(bad_step) >= 0:  # stop before non-finite weights are saved as a "trained" model
            at = int(bad_step)
            raise TrainingError(
                f"training loss is {float(bad_loss)} at epoch {epoch + 1}, step {at + 1} (lr {rates[at]:.4g}); "
                f"lower the learning rate or check the data; the last finished epoch's state is kept"
            )
        validation = evaluate(eval_model, eval_loader, data.num_classes, device, sum_over_ranks=ranks > 1)
        result.seconds += time.perf_counter() - started
        record = {"epoch": epoch + 1, "lr": lr, "train_loss": float(loss_sum) / seen, "train_accuracy": int(correct) / seen,
                  f"{eval_split}_loss": validation.loss, f"{eval_split}_accuracy": validation.accuracy,
                  "seconds": result.seconds}
        result.history.append(record)
        result.epochs_completed = epoch + 1
        if state_file is not None and writer:
            # SyncBatchNorm's state has BatchNorm's keys: a state resumes on any number of ranks
            atomic_torch_save({"format": STATE_FORMAT, **expected, "epoch": epoch + 1, "seconds": result.seconds,
                               "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                               "history": result.history}, state_file)
        barrier()  # no rank runs ahead of the saved state
        if log_path is not None and writer:
            with open(log_path, "a", encoding="utf-8") as handle:
                handle.write(json.dumps(record) + "\n")
        epochs.set_postfix(val_acc=f"{validation.accuracy:.4f}", loss=f"{record['train_loss']:.3f}")
        if on_epoch is not None:
            on_epoch(record)
    if synced:
        from_sync_batchnorm_(model)
    model.eval()
    return result
