"""Experiment configuration as typed dataclasses: profiles, JSON/YAML round trip, validation.

Validation walks the dataclass type hints and per-field ``metadata`` (choices, min, max) so each
error names the dotted field, the bad value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import ConfigError
from .fileio import atomic_write_text

PROFILES = ("quick", "cifar10", "paper", "imagenet")
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("float32", "float64")


def _f(default: Any, **meta: Any) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


@dataclass
class DataConfig:
    name: str = _f("digits", choices=("digits", "cifar10", "cifar100", "imagefolder", "imagenet"))
    root: str | None = None
    val_fraction: float = _f(0.1, min=0.001, max=0.5)
    split_seed: int = _f(0, min=0)
    download: bool = False
    image_size: int = _f(224, min=8, max=4096)  # imagenet (read lazily): side of the square crops
    workers: int = _f(0, min=0, max=256)         # imagenet: DataLoader worker processes (speed only, same batches)


@dataclass
class ModelConfig:
    name: str = _f("digits_cnn", choices=("digits_cnn", "resnet20", "resnet32", "vgg_small", "resnet18", "resnet50",
                                          "mobilenet_v2"))
    width: float = _f(1.0, min=0.01, max=64.0)
    # load the shipped checkpoint for (model, data set) instead of training; for torchvision's models
    # (resnet18, resnet50, mobilenet_v2) torchvision's ImageNet weights: downloaded, or weights_file
    pretrained: bool = False
    weights_file: str | None = None  # a torchvision state dict on disk (machines without internet)


@dataclass
class TrainConfig:
    epochs: int = _f(30, min=1, max=10_000)
    batch_size: int = _f(64, min=1, max=65_536)
    lr: float = _f(0.05, min=1e-8, max=10.0)
    momentum: float = _f(0.9, min=0.0, max=0.999)
    nesterov: bool = True
    weight_decay: float = _f(5e-4, min=0.0, max=1.0)
    schedule: str = _f("onecycle", choices=("onecycle", "cosine", "step", "constant"))
    warmup_epochs: float = _f(0.0, min=0.0, max=10_000.0)
    milestones: list[float] = _f([0.5, 0.75], min=0.0, max=1.0)  # fractions of the run
    gamma: float = _f(0.1, min=0.0, max=1.0)
    label_smoothing: float = _f(0.0, min=0.0, max=0.99)
    channels_last: bool = True
    # torch.compile of the training step (objective, forward and backward) and of evaluation: "auto" is
    # on for CUDA (CUDA graphs, mode "reduce-overhead": the ResNet-20 step is bound by kernel launches),
    # and on the CPU for float32 runs long enough to repay compiling (see
    # cpq_lib.train.trainer.compile_mode); short CPU runs stay eager (it changes their last bits)
    compile: str = _f("auto", choices=("auto", "on", "off"))
    # under torchrun: BatchNorm statistics over the global batch (SyncBatchNorm; GPUs only) instead of per rank
    sync_bn: bool = False


@dataclass
class RefineConfig(TrainConfig):
    """Quantization-aware fine-tuning of the quantized student against the full-precision teacher:
    ``alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)`` (batch mean), learnable quantizer scales."""

    epochs: int = _f(3, min=0, max=10_000)
    lr: float = _f(0.01, min=1e-8, max=10.0)
    schedule: str = _f("cosine", choices=("onecycle", "cosine", "step", "constant"))
    max_steps: int | None = _f(None, min=1)  # a budget in optimizer steps instead of whole epochs
    alpha: float = _f(0.3, min=0.0, max=1.0)
    temperature: float = _f(4.0, min=0.01, max=100.0)
    learnable_scales: bool = True


ALLOCATOR_NAMES = ("uniform", "random", "class_count", "class_count_sum", "sensitivity", "hawq", "hawq_channel", "hawq_class",
                   "aimet", "classpath", "classpath_cpq", "classpath_random_paths", "classpath_reversed")  # cpq_lib.allocation.ALLOCATORS


@dataclass
class AllocationConfig:
    """Which allocator, for which budget, and the knobs of the searches (see cpq_lib.allocation)."""

    method: str = _f("classpath", choices=ALLOCATOR_NAMES)
    weight_bits: float = _f(2.0, min=0.5, max=16.0)  # target average weight bits (plus slack)
    act_bits: int | None = _f(2, min=1, max=16)
    slack: float = _f(0.06, min=0.0, max=0.99)
    max_gbitops: float | None = _f(None, min=1e-6, max=1e9)  # also a BitOPs budget (GBitOPs per sample; every allocator)
    max_bytes: float | None = _f(None, min=1.0, max=1e13)     # also a size budget (stored bytes; every allocator)
    search_images: int | None = _f(None, min=10)  # validation images a search evaluates on (None: all)
    bn_images: int = _f(512, min=0)                # training images each evaluated plan re-estimates BatchNorm on (0: off)
    calibration_images: int = _f(512, min=1)       # training images for activation scales
    images_per_class: int = _f(50, min=1)           # training images per class for class scores
    # signed weight grid of searched and refined plans (cpq_lib.quant.QuantConfig): "full" [-2^(b-1), 2^(b-1)-1]
    # (LSQ's four levels at 2 bits) or "narrow" (ternary at 2 bits). Full by measurement: on CIFAR-10 W2A2,
    # 3 seeds of uniform and of classpath, full was ahead after refinement in 5 of 6 pairs and tied in one
    # (+0.33 points, 95% CI -0.03 to +0.70; results/cifar10/weight-grid.csv), and it is the grid the W2 literature uses.
    weight_grid: str = _f("full", choices=("narrow", "full"))
    sparsities: list[float] = _f([0.3, 0.5, 0.6, 0.9], min=0.0, max=0.99)
    # class-path and class-count knobs; None: the preset's value (cpq_lib.allocation.class_paths)
    t1: float | None = _f(None, min=0.01, max=1.0)
    r: float | None = _f(None, min=0.01, max=1.0)
    similarity: str | None = _f(None, choices=("jaccard", "interference", None))
    fill: bool | None = None
    grid: int = _f(40, min=1, max=10_000)
    start_bits: int | None = _f(None, min=1, max=16)


@dataclass
class ExperimentConfig:
    profile: str = _f("quick", choices=PROFILES)
    seed: int = _f(0, min=0)
    device: str = _f("auto", choices=DEVICES)
    threads: int | None = _f(None, min=1, max=1024)  # None: torch's default (one per core)
    deterministic: bool = False  # deterministic kernels and CPU code paths pinned (see cpq_lib.runtime)
    dtype: str = _f("float32", choices=DTYPES)  # default float precision of models and data (quick: float64)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    allocation: AllocationConfig = field(default_factory=AllocationConfig)
    refine: RefineConfig = field(default_factory=RefineConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def resolved_device(self) -> str:
        import torch

        if self.device == "auto":
            return "cuda" if torch.cuda.is_available() else "cpu"
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ConfigError("device: 'cuda' was requested but no CUDA device is available; use 'cpu' or 'auto'")
        return self.device


def _check_scalar(value: Any, hint: Any, where: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        inner = [o for o in options if o is not type(None)]
        return _check_scalar(value, inner[0], where)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        (item,) = typing.get_args(hint)
        return [_check_scalar(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{where}: expected a finite number, got {value!r}")
        return float(value)
    if hint is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise ConfigError(f"{where}: unsupported field type {hint!r}")


def from_dict(cls: type, data: Any, where: str = "") -> Any:
    """Build dataclass ``cls`` from a plain mapping, validating every field."""
    label = where or cls.__name__
    if not isinstance(data, dict):
        raise ConfigError(f"{label}: expected a mapping of fields, got {type(data).__name__} {data!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise ConfigError(f"{label}: unknown field(s) {unknown}; allowed: {sorted(fields)}")
    values = {}
    for name, value in data.items():
        dotted = f"{where}.{name}" if where else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            values[name] = from_dict(hint, value, dotted)
            continue
        value = _check_scalar(value, hint, dotted)
        meta = fields[name].metadata
        if "choices" in meta and value not in meta["choices"]:
            raise ConfigError(f"{dotted}: {value!r} is not allowed; choose one of {list(meta['choices'])}")
        items = value if isinstance(value, list) else [value]
        for index, item in enumerate(items):
            label = f"{dotted}[{index}]" if isinstance(value, list) else dotted
            if item is not None and "min" in meta and item < meta["min"]:
                raise ConfigError(f"{label}: {item!r} is below the minimum {meta['min']}")
            if item is not None and "max" in meta and item > meta["max"]:
                raise ConfigError(f"{label}: {item!r} is above the maximum {meta['max']}")
        values[name] = value
    return cls(**values)


def _profile_defaults(profile: str) -> dict[str, Any]:
    if profile == "quick":
        # one thread, pinned kernels and float64: the stored notebooks' checked outputs hold on any x86-64
        # CPU, and their numbers reproduce bit for bit (cpq_lib.runtime)
        return {"profile": "quick", "threads": 1, "deterministic": True, "dtype": "float64", "data": {"name": "digits"}, "model": {"name": "digits_cnn"},
                "train": {"epochs": 30, "batch_size": 64, "lr": 0.05, "label_smoothing": 0.0},
                # BatchNorm re-estimated on 64 training images and two path sparsities: searches of seconds
                "allocation": {"images_per_class": 50, "search_images": None, "bn_images": 64, "sparsities": [0.5, 0.9]},
                "refine": {"epochs": 3, "batch_size": 64, "lr": 0.01}}
    if profile == "cifar10":
        # the recipe of the shipped resnet20 (see cpq_lib/models/pretrained/resnet20_cifar10.json)
        return {"profile": "cifar10", "data": {"name": "cifar10"}, "model": {"name": "resnet20", "pretrained": True},
                "train": {"epochs": 200, "batch_size": 128, "lr": 0.1, "weight_decay": 5e-4, "schedule": "onecycle",
                          "label_smoothing": 0.1, "nesterov": True},
                # searches: 1,000 validation images, BN re-estimated per plan; 2,000 cost 1.7x and agreed no
                # better with the refined accuracy on the committed plans (results/cifar10/search_signal.json)
                "allocation": {"images_per_class": 100, "search_images": 1000},
                "refine": {"epochs": 3, "batch_size": 128, "lr": 0.01}}
    if profile == "paper":
        # thesis settings: 400 epochs, SGD lr 0.1, momentum 0.9, wd 1e-4; meant for a GPU
        return {"profile": "paper", "device": "auto", "data": {"name": "cifar10"}, "model": {"name": "resnet20"},
                "train": {"epochs": 400, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4, "schedule": "cosine",
                          "nesterov": False},
                "allocation": {"images_per_class": 100, "search_images": 1000},
                "refine": {"epochs": 400, "batch_size": 128, "lr": 0.1, "weight_decay": 1e-4, "nesterov": False}}
    if profile == "imagenet":
        # ImageNet-style folders read lazily (train/ and val/; val/ is the test split), torchvision's
        # ResNet-18 with its ImageNet weights; heavy stages are for GPUs (docs/imagenet.md)
        return {"profile": "imagenet", "device": "auto",
                "data": {"name": "imagenet", "val_fraction": 0.01, "image_size": 224, "workers": 8},
                "model": {"name": "resnet18", "pretrained": True},
                "train": {"epochs": 90, "batch_size": 256, "lr": 0.1, "weight_decay": 1e-4, "schedule": "cosine",
                          "nesterov": False, "label_smoothing": 0.0},
                "allocation": {"images_per_class": 10, "search_images": 5000, "bn_images": 1024, "calibration_images": 1024},
                "refine": {"epochs": 1, "batch_size": 256, "lr": 0.001, "weight_decay": 1e-4}}
    raise ConfigError(f"profile: {profile!r} is not allowed; choose one of {list(PROFILES)}")


def _merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        merged[key] = _merge(merged[key], value) if isinstance(value, dict) and isinstance(merged.get(key), dict) else value
    return merged


def _undot(overrides: dict[str, Any]) -> dict[str, Any]:
    nested: dict[str, Any] = {}
    for key, value in overrides.items():
        *parents, leaf = key.split(".")
        node = nested
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return nested


def make_config(profile: str = "quick", overrides: dict[str, Any] | None = None) -> ExperimentConfig:
    """Profile defaults updated with ``overrides`` (nested or dotted keys, e.g. ``{"data.root": ...}``)."""
    data = _merge(_profile_defaults(profile), _undot(overrides or {}))
    return from_dict(ExperimentConfig, data)


def with_overrides(config: ExperimentConfig, overrides: dict[str, Any]) -> ExperimentConfig:
    """A validated copy of ``config`` with ``overrides`` (nested or dotted keys) applied."""
    return from_dict(ExperimentConfig, _merge(config.to_dict(), _undot(overrides)))


def load_config(path: str | os.PathLike) -> ExperimentConfig:
    """Read JSON (``.json``) or YAML (``.yaml``/``.yml``); the file's ``profile`` supplies the defaults."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    import yaml

    suffix = path.suffix.lower()
    if suffix not in (".json", ".yaml", ".yml"):
        raise ConfigError(f"config file {path}: unknown suffix {path.suffix!r}; allowed: .json, .yaml, .yml")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        raise ConfigError(f"config file {path} is malformed: {exc}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path} must hold a mapping at the top level, got {type(data).__name__}")
    profile = data.get("profile", "quick")
    if profile not in PROFILES:
        raise ConfigError(f"profile: {profile!r} is not allowed; choose one of {list(PROFILES)}")
    return from_dict(ExperimentConfig, _merge(_profile_defaults(profile), data))


def save_config(config: ExperimentConfig, path: str | os.PathLike) -> None:
    path = Path(path)
    data = config.to_dict()
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        atomic_write_text(yaml.safe_dump(data, sort_keys=False), path)
    else:
        atomic_write_text(json.dumps(data, indent=2) + "\n", path)
