"""Stage glue shared by notebooks and command lines: data and baseline model for a configuration."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from filelock import FileLock
from torch import nn

from .artefacts import ArtefactKey
from .config import ExperimentConfig
from .data import DataBundle, load_dataset
from .errors import CheckpointError
from .models import build_model, load_checkpoint, load_pretrained, save_checkpoint
from .models.torchvision_models import IMAGENET_CLASSES, TORCHVISION_MODELS, load_torchvision_weights
from .provenance import code_fingerprint, environment_record
from .train import evaluate, train_model
from .train.distributed import agree, barrier, is_writer
from .fileio import atomic_write_json


def load_data(config: ExperimentConfig) -> DataBundle:
    d = config.data
    return load_dataset(d.name, d.root, val_fraction=d.val_fraction, split_seed=d.split_seed, download=d.download,
                        image_size=d.image_size, workers=d.workers)


def model_kwargs(config: ExperimentConfig, data: DataBundle) -> dict[str, Any]:
    """Build arguments for the configured model on ``data`` (recorded in the model card)."""
    mean, std = data.channel_stats()
    kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_channels": data.in_channels,
                              "width": config.model.width, "mean": mean, "std": std}
    if config.model.name == "vgg_small":
        kwargs["image_size"] = data.image_size[0]
    return kwargs


def check_card_matches(card: dict[str, Any], data: DataBundle, path: str | os.PathLike) -> None:
    """A checkpoint must have been trained without exactly this validation split and these classes."""
    recorded = card.get("data", {})
    if recorded.get("classes") != data.classes:
        raise CheckpointError(f"class mismatch: checkpoint {path} was trained on classes {recorded.get('classes')}, the data has {data.classes}")
    if recorded.get("val_digest") != data.val_digest:
        same_settings = (recorded.get("split_seed"), recorded.get("val_fraction")) == (data.split_seed, data.val_fraction)
        cause = ("same split seed and fraction, so the data itself differs (another copy, or other images in "
                 "the class folders)" if same_settings else
                 f"it used split seed {recorded.get('split_seed')}, fraction {recorded.get('val_fraction')}; this data "
                 f"uses seed {data.split_seed}, fraction {data.val_fraction}")
        raise CheckpointError(
            f"checkpoint {path} was trained with another validation split ({cause}; validation digests "
            f"{recorded.get('val_digest')} vs {data.val_digest}): its validation images may be training images here"
        )


def final_report(model: nn.Module, data: DataBundle, device: str, per_image: bool = False) -> dict[str, Any]:
    """Validation and test accuracy of a finished model (the only place the test split is read).

    ``per_image``: also which test images it classifies correctly (``test_correct``, a bool tensor in
    test-split order), what a paired test between two models needs.
    """
    val = evaluate(model, data.eval_loader("val"), data.num_classes, device)
    test = evaluate(model, data.eval_loader("test"), data.num_classes, device, per_image=per_image)
    report = {"val_accuracy": val.accuracy, "val_loss": val.loss, "test_accuracy": test.accuracy, "test_loss": test.loss,
              "per_class_test_accuracy": dict(zip(data.classes, test.per_class_accuracy))}
    if per_image:
        report["test_correct"] = test.correct
    return report


# the code a trained baseline depends on (the pinned CPU code paths included): a cached one made by other code is trained again
BASELINE_CODE = ("config", "cpu_env", "data", "models", "runtime", "train")


def baseline_key(config: ExperimentConfig, data: DataBundle) -> ArtefactKey:
    """What a trained baseline depends on: model, its build arguments, training settings, seed, data split,
    precision and code (the pinned CPU code paths included)."""
    return ArtefactKey.make("baseline", {
        "model": config.model.name, "model_kwargs": model_kwargs(config, data), "train": config.train, "seed": config.seed,
        "dataset": data.name, "val_digest": data.val_digest, "dtype": torch.get_default_dtype()}, BASELINE_CODE)


def train_baseline(config: ExperimentConfig, data: DataBundle, out_dir: str | os.PathLike, *,
                   progress: bool = True, command: str | None = None, cache: bool = False) -> tuple[nn.Module, dict[str, Any]]:
    """Train the configured model from scratch (resuming from ``out_dir/state.pt``) and save ``out_dir/model.pt``.

    ``cache``: ``out_dir`` is cpq's baseline cache, where a training state of another key is discarded
    (in a user's ``--out`` folder it is an error instead).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    device = config.resolved_device()
    kwargs = model_kwargs(config, data)
    key = baseline_key(config, data)
    torch.manual_seed(config.seed)  # weight initialisation is part of the recorded run
    model = build_model(config.model.name, **kwargs).to(device)
    result = train_model(model, data, config.train, seed=config.seed, device=device, state_path=out / "state.pt",
                         log_path=out / "log.jsonl", progress=progress, state_key={"artefact": key.digest},
                         restart_stale=cache)
    # the layout a checkpoint loads into (training leaves channels_last parameters): a fresh and a
    # cached baseline must compute bit for bit alike, or every later stage depends on the cache
    model = model.to(memory_format=torch.contiguous_format)
    card = {
        "model": config.model.name, "model_kwargs": kwargs, "data": data.describe(),
        "seed": config.seed, "dtype": parameter_dtype(model), "epochs": result.epochs_completed, "train": dataclasses.asdict(config.train),
        "wall_time_seconds": round(result.seconds, 1), "history": result.history,
        **final_report(model, data, device),
        "command": command or "python -m cpq_lib.train " + shlex.join(sys.argv[1:]),
        "environment": environment_record(), "code_fingerprint": code_fingerprint(*BASELINE_CODE),
        "artefact_key": key.to_dict(),
    }
    if is_writer():  # under torchrun, rank 0 writes; the others wait until the files are there
        save_checkpoint(model, out / "model.pt", card)
        atomic_write_json(card, out / "model.json")
    barrier()
    return model, card


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def parameter_dtype(model: nn.Module) -> str:
    """The float precision a model was trained in (a cached baseline is reused only in the same one)."""
    return dtype_name(next(model.parameters()).dtype)


def baseline_folder(run_dir: str | os.PathLike, seed: int) -> Path:
    """Where a trained baseline of ``seed`` is cached: one folder per seed, so runs of several seeds
    sharing a folder (a sweep) do not retrain each other's baseline."""
    return Path(run_dir) / "baseline" / f"seed-{seed}"


def baseline_model(config: ExperimentConfig, data: DataBundle, run_dir: str | os.PathLike, *,
                   progress: bool = True) -> tuple[nn.Module, dict[str, Any]]:
    """The full-precision model of a profile: the shipped checkpoint, a cached one in ``run_dir``
    (``baseline/seed-<seed>``), or a newly trained one; on the configuration's device."""
    device = config.resolved_device()
    if config.model.pretrained and config.model.name in TORCHVISION_MODELS:
        return _torchvision_pretrained(config, data)
    if config.model.pretrained:
        model, card = load_pretrained(config.model.name, data.name)
        check_card_matches(card, data, f"shipped {config.model.name}_{data.name}")
        return model.to(device), card
    path = baseline_folder(run_dir, config.seed) / "model.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    # runs of a sweep in parallel processes train it once; the ranks of one torchrun job train it together
    # (rank 0 holds the lock and decides whether the cached one is usable)
    with FileLock(str(path.parent / ".lock")) if is_writer() else contextlib.nullcontext():
        return _cached_or_trained_baseline(config, data, path, progress)


def _torchvision_pretrained(config: ExperimentConfig, data: DataBundle) -> tuple[nn.Module, dict[str, Any]]:
    """torchvision's ImageNet weights for the configured model, with a card saying where they came from.

    They were trained on all of ImageNet's training images, the validation split held out of train/
    included: searches on it rank plans against each other but overstate accuracy; the test split
    (ImageNet's val/) is unseen by them."""
    if data.num_classes != IMAGENET_CLASSES:
        raise CheckpointError(f"torchvision's ImageNet weights for {config.model.name} have {IMAGENET_CLASSES} classes; "
                              f"the data has {data.num_classes}: train a baseline instead (model.pretrained=false)")
    kwargs = model_kwargs(config, data)
    model = build_model(config.model.name, **kwargs)
    source = load_torchvision_weights(model, config.model.name, config.model.weights_file)
    card = {"model": config.model.name, "model_kwargs": kwargs, "weights": source, "data": data.describe(),
            "note": "torchvision's ImageNet weights: trained on every train/ image, this run's validation split included"}
    return model.to(config.resolved_device()).eval(), card


def _cached_or_trained_baseline(config: ExperimentConfig, data: DataBundle, path: Path,
                                progress: bool) -> tuple[nn.Module, dict[str, Any]]:
    device = config.resolved_device()
    usable = False
    if is_writer() and path.is_file():
        card = load_checkpoint(path, model=config.model.name, num_classes=data.num_classes)[1]
        usable = ArtefactKey.from_dict(card.get("artefact_key")) == baseline_key(config, data)
        if not usable:
            for stale in (path, path.parent / "state.pt", path.parent / "log.jsonl"):  # another run's: start over
                stale.unlink(missing_ok=True)
    if agree(usable):
        model, card = load_checkpoint(path, model=config.model.name, num_classes=data.num_classes)
        check_card_matches(card, data, path)
        return model.to(device), card
    return train_baseline(config, data, path.parent, progress=progress, command="cpq_lib.pipeline.baseline_model", cache=True)


def class_scores(model: nn.Module, data: DataBundle, run_dir: str | os.PathLike, *, images_per_class: int,
                 split: str = "train", seed: int = 0, settings=None, exclude=None, device: str = "cpu",
                 progress: bool = True):
    """Class-importance scores of ``model`` on ``images_per_class`` images of each class, cached in ``run_dir``.

    Scores come from training (or validation) images, never test. Layers that ``exclude`` patterns
    keep in full precision are scored too and flagged.
    """
    from .classpath import ScoreSettings, cached_scores, score_classes
    from .errors import DataError
    from .quant.transform import DEFAULT_EXCLUDE, excluded_names

    if split == "test":
        raise DataError("class scores feed bit searches: use the train or val split, never test")
    settings = settings or ScoreSettings()
    full_precision = excluded_names(model, DEFAULT_EXCLUDE if exclude is None else exclude)
    data_key = {"dataset": data.name, "split": split, "images_per_class": images_per_class, "seed": seed,
                "val_digest": data.val_digest, "full_precision": sorted(full_precision)}

    def compute():
        loader = data.per_class_loader(images_per_class, split=split, seed=seed)
        return score_classes(model, loader, data.num_classes, data.classes, settings, device, full_precision, progress)

    return cached_scores(Path(run_dir) / "cache", model, data_key, compute, settings)
