"""One experiment, end to end: configuration in, result record (JSON) out.

Stages, each resumable after a kill: the full-precision baseline (shared, cached), class scores from
training images (shared, cached), the quantized student calibrated on training images, the bit search
on the validation split (``search.json``), the student with its plan before refinement
(``before_refinement.pt``), knowledge-distillation refinement (``refine_state.pt`` every epoch), and
the record (``record.json``), whose presence marks the run finished. The test split is read once,
in the final report, after everything else; searches get a view of the data without it.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from filelock import FileLock
from torch import nn

from .artefacts import ArtefactKey, check_same_key, read_key_file, write_key_file
from .allocation import NEEDS_SCORES, AllocationResult, SearchEvaluator, Target, allocate
from .allocation.evaluator import bn_batches
from .allocation.report import plan_digest
from .statistics import pack_correct
from .classpath import ScoreSettings
from .config import ExperimentConfig
from .data import DataBundle, SearchData
from .errors import CpqError
from .fileio import atomic_torch_save, atomic_write_json
from .pipeline import baseline_model, class_scores, final_report, load_data
from .provenance import run_record
from .quant import BitPlan, QuantConfig, calibrate_, model_summary, quantize_
from .quant.batchnorm import reestimate_bn_
from .runtime import configure_for
from .train import Distillation, train_model
from .train.distributed import agree, barrier, is_writer, world
from .train.evaluate import memory_format_of

RECORD = "record.json"
SEARCH = "search.json"
BEFORE = "before_refinement.pt"
REFINE_STATE = "refine_state.pt"
REFINE_LOG = "refine_log.jsonl"
INTERMEDIATES = (SEARCH, BEFORE, REFINE_STATE, REFINE_LOG)  # remade when the run's key changes
STALE_POLICIES = ("refuse", "recompute")
# the code an experiment's numbers depend on: a record made by other code is not mixed with new ones
EXPERIMENT_CODE = ("allocation", "classpath", "config", "cpu_env", "data", "experiment", "models", "pipeline", "quant",
                   "runtime", "train")


class RecordError(CpqError):
    """A run's record file is damaged, or something else sits where it belongs."""


def experiment_key(config: ExperimentConfig) -> ArtefactKey:
    """What a run's record depends on: the configuration (less where the data lives) and the code."""
    settings = config.to_dict()
    settings.get("data", {}).pop("root", None)
    return ArtefactKey.make("experiment", settings, EXPERIMENT_CODE)


def read_record(path: str | os.PathLike) -> dict[str, Any]:
    """A run's ``record.json``, or RecordError naming the file and what is wrong with it."""
    path = Path(path)
    if path.is_dir():
        raise RecordError(f"{path} is a folder where a run's record file belongs; remove it to run the run again")
    if not path.is_file():
        raise RecordError(f"{path}: no such file (the run has not finished, or this is not a run folder)")
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as exc:
        raise RecordError(f"{path} is not a text file ({exc}); remove it to run the run again") from None
    except json.JSONDecodeError as exc:
        raise RecordError(f"{path} is not valid JSON ({exc.msg} at line {exc.lineno}, column {exc.colno}: damaged or "
                          f"truncated); remove it to run the run again") from None
    missing = [k for k in ("config", "results") if not isinstance(record, dict) or k not in record]
    if missing:
        raise RecordError(f"{path} is not a run record: it has no {missing}; remove it to run the run again")
    return record


def quantized_student(model: nn.Module, config: ExperimentConfig, data: SearchData, device: str) -> nn.Module:
    """A quantized copy of ``model``: per-channel symmetric weights (MSE-searched scales, 8 bits until a
    plan is set), activations at the target width with MSE-searched clips calibrated on training images."""
    a = config.allocation
    quant = QuantConfig(weight_bits=8, act_bits=a.act_bits, weight_init="mse", act_init="mse",
                        learnable_scales=config.refine.learnable_scales, weight_grid=a.weight_grid)
    student = quantize_(copy.deepcopy(model).to(device), quant).eval()
    calibrate_(student, data.calibration_loader(a.calibration_images, seed=config.seed), device)
    return student


def search_knobs(config: ExperimentConfig) -> dict[str, Any]:
    a = config.allocation
    knobs: dict[str, Any] = {"start_bits": a.start_bits}
    if a.method.startswith("classpath"):
        knobs.update(sparsities=list(a.sparsities), t1=a.t1, r=a.r, similarity=a.similarity, fill=a.fill)
    elif a.method.startswith("class_count"):
        knobs.update(grid=a.grid, t1=a.t1)
    return knobs


def run_search(student: nn.Module, config: ExperimentConfig, data: SearchData, scores, device: str,
               progress: bool, cache_dir: str | os.PathLike | None = None) -> AllocationResult:
    """The configured allocator's plan; ``cache_dir``: where runs sharing a model cache their Hessian traces."""
    a = config.allocation
    evaluator = SearchEvaluator(student, data, a.search_images, seed=config.seed, device=device, bn_images=a.bn_images)
    target = Target(a.weight_bits, a.act_bits, a.slack, a.max_gbitops, a.max_bytes)
    knobs = search_knobs(config)
    if cache_dir is not None and a.method.startswith("hawq"):
        knobs["trace_cache"] = cache_dir
    return allocate(a.method, evaluator, target, scores=scores, seed=config.seed, progress=progress, **knobs)


def _load_search(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        saved = json.loads(path.read_text(encoding="utf-8"))
        BitPlan.from_dict(saved["plan"])
        return saved
    except (OSError, ValueError, KeyError):
        return None  # damaged: search again


def run_experiment(config: ExperimentConfig, run_dir: str | os.PathLike, *, shared_dir: str | os.PathLike | None = None,
                   data: DataBundle | None = None, progress: bool = True, stale: str = "refuse") -> dict[str, Any]:
    """Run (or finish, or just read) the experiment ``config`` in ``run_dir``; returns its record.

    ``shared_dir`` holds what runs of one sweep share: the trained baseline and cached class scores
    (default: ``run_dir``). ``data``: an already loaded bundle for ``config.data`` (saves reloading).
    A finished record made with another configuration or other code (:func:`experiment_key`) is refused
    (``stale="refuse"``: it is somebody's result) or run again (``"recompute"``: ``run_dir`` is a
    cache, as the notebooks' ``runs/`` is). Unfinished stages of another key are always remade.
    """
    if stale not in STALE_POLICIES:
        raise ValueError(f"stale: {stale!r} is not allowed; choose one of {list(STALE_POLICIES)}")
    run = Path(run_dir)
    key = experiment_key(config)
    writer = is_writer()
    record = agree(_finished_record(run / RECORD, key, stale) if writer else None)
    if record is not None:
        return record
    run.mkdir(parents=True, exist_ok=True)
    # a second process on this run (a restarted sweep) waits, then reads; the ranks of one torchrun job
    # run it together, rank 0 holding the lock and writing every file
    with FileLock(str(run / ".lock")) if writer else contextlib.nullcontext():
        record = agree(_finished_record(run / RECORD, key, stale) if writer else None)
        if record is not None:
            return record
        if writer and read_key_file(run / RECORD) != key:  # stages of another configuration or code: start over
            for name in INTERMEDIATES:
                (run / name).unlink(missing_ok=True)
            write_key_file(run / RECORD, key)
        barrier()
        return _run_experiment(config, run, shared_dir, data, progress, key)


def _finished_record(path: Path, key: ArtefactKey, stale: str) -> dict[str, Any] | None:
    if not path.exists():
        return None
    record = read_record(path)
    recorded = ArtefactKey.from_dict(record.get("artefact_key"))
    if recorded == key:
        return record
    if stale == "recompute":
        path.unlink()
        return None
    check_same_key(recorded, key, path, f"use another run folder (sweep --out), or remove {path.parent} to run it again")
    return record


def _run_experiment(config: ExperimentConfig, run: Path, shared_dir: str | os.PathLike | None,
                    data: DataBundle | None, progress: bool, key: ArtefactKey) -> dict[str, Any]:
    record_path = run / RECORD
    shared = Path(shared_dir) if shared_dir is not None else run
    started = time.perf_counter()
    configure_for(config)
    device = config.resolved_device()
    data = data if data is not None else load_data(config)
    search_data = data.for_search()
    teacher, card = baseline_model(config, data, shared, progress=progress)
    teacher = teacher.to(device).eval()
    a = config.allocation
    writer = is_writer()  # under torchrun: rank 0 scores, searches and reports; every rank refines (DDP)
    scores = None
    for turn in (True, False):  # rank 0 first (it fills the cache), then the others read it
        if a.method in NEEDS_SCORES and writer == turn:
            scores = class_scores(teacher, search_data, shared, images_per_class=a.images_per_class, seed=config.seed,
                                  settings=ScoreSettings(), device=device, progress=progress)
        barrier()
    student = quantized_student(teacher, config, search_data, device)

    saved = _load_search(run / SEARCH) if writer else None
    if writer and saved is None:
        result = run_search(student, config, search_data, scores, device, progress, cache_dir=shared / "cache")
        saved = {"plan": result.plan.to_dict(), "trajectory": result.trajectory.to_dict("records"), "cost": result.cost,
                 "accuracy": result.accuracy, "details": result.details}
        atomic_write_json(json.loads(json.dumps(saved, default=float)), run / SEARCH)
    barrier()
    saved = saved if writer else _load_search(run / SEARCH)
    plan = BitPlan.from_dict(saved["plan"])
    before_path = run / BEFORE
    if writer and not before_path.is_file():
        plan.apply_(student)  # per-channel scales for the plan's bits (what the search evaluated)
        if a.bn_images:  # BatchNorm statistics for the plan, on the images the search re-estimated them on
            reestimate_bn_(student, bn_batches(search_data, a.bn_images, config.seed, device, memory_format_of(student)), device)
        atomic_torch_save(student.state_dict(), before_path)
    barrier()
    student.load_state_dict(torch.load(before_path, map_location=device, weights_only=True))

    refine = config.refine
    history: list[dict] = []
    refine_seconds = 0.0
    if refine.epochs > 0:
        trained = train_model(student, search_data, refine, seed=config.seed, device=device,
                              state_path=run / REFINE_STATE, log_path=run / REFINE_LOG, progress=progress,
                              objective=Distillation(teacher, refine.alpha, refine.temperature),
                              state_key={"plan": plan_digest(plan)})
        history, refine_seconds = trained.history, trained.seconds
    student.eval()
    if not writer:  # rank 0 reports and writes the record
        barrier()
        return read_record(record_path)

    # the final report: the only place the test split is read
    before = quantized_student(teacher, config, search_data, device)
    before.load_state_dict(torch.load(before_path, map_location=device, weights_only=True))
    example = data.example(1).to(device)
    results = {
        "allocator": a.method, "target": {"weight_bits": a.weight_bits, "act_bits": a.act_bits,
                                          "max_bits": a.weight_bits + a.slack, "label": Target(a.weight_bits, a.act_bits, a.slack).label()},
        "plan": plan.to_dict(), "average_bits": plan.average_weight_bits(student),
        "metrics": model_summary(student, example),
        "search": {"cost": saved["cost"], "accuracy": saved["accuracy"], "details": saved["details"],
                   "trajectory": saved["trajectory"]},
        "before_refinement": _report(before, data, device),
        "after_refinement": _report(student, data, device),
        "refinement": {"epochs": refine.epochs, "max_steps": refine.max_steps, "seconds": round(refine_seconds, 1),
                       "history": history},
        "baseline": {"val_accuracy": card.get("val_accuracy"), "test_accuracy": card.get("test_accuracy")},
        "seconds": round(time.perf_counter() - started, 1),
    }
    results["refinement"]["ranks"] = world()[1]
    record = {**run_record(config, json.loads(json.dumps(results, default=float))), "artefact_key": key.to_dict()}
    atomic_write_json(record, record_path)
    barrier()
    return record


def _report(model: nn.Module, data: DataBundle, device: str) -> dict[str, Any]:
    report = final_report(model, data, device, per_image=True)
    kept = {k: report[k] for k in ("val_accuracy", "val_loss", "test_accuracy", "test_loss", "per_class_test_accuracy")}
    return {**kept, "test_correct": pack_correct(report["test_correct"])}


def tidy_row(record: dict[str, Any]) -> dict[str, Any]:
    """One flat row of a record: what a comparison table or plot needs."""
    r = record["results"]
    search = r["search"]
    row = {
        "allocator": r["allocator"], "target": r["target"]["label"], "target_bits": r["target"]["weight_bits"],
        "act_bits": r["target"]["act_bits"], "seed": record["seed"], "average_bits": r["average_bits"],
        "bitops": r["metrics"]["bitops"], "size_bytes": r["metrics"]["size_bytes"],
        "compression_ratio": r["metrics"]["compression_ratio"],
        "val_before": r["before_refinement"]["val_accuracy"], "test_before": r["before_refinement"]["test_accuracy"],
        "val_after": r["after_refinement"]["val_accuracy"], "test_after": r["after_refinement"]["test_accuracy"],
        "search_accuracy": search["accuracy"], "evaluations": search["cost"]["evaluations"],
        "search_seconds": search["cost"]["search_seconds"], "refine_epochs": r["refinement"]["epochs"],
        "refine_seconds": r["refinement"]["seconds"], "seconds": r["seconds"],
        "sparsity": search["details"].get("sparsity"),
        "bn_images": search["cost"].get("bn_images", 0), "search_images": search["cost"].get("validation_images"),
    }
    return row


TIDY_COLUMNS = ("allocator", "target", "target_bits", "act_bits", "seed", "average_bits", "bitops", "size_bytes",
                "compression_ratio", "val_before", "test_before", "val_after", "test_after", "search_accuracy",
                "evaluations", "search_seconds", "refine_epochs", "refine_seconds", "seconds", "sparsity", "bn_images",
                "search_images")


def tidy_frame(records: list[dict[str, Any]]) -> pd.DataFrame:
    return pd.DataFrame([tidy_row(r) for r in records], columns=list(TIDY_COLUMNS))
