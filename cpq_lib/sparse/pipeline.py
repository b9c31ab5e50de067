"""The focused-quantization compression pipeline and its Deep Compression baseline, resumable by stage.

1. **Pruning**: magnitude pruning to ``sparsity`` along Zhu & Gupta's cubic schedule (``prune_steps``
   steps), each followed by ``prune_epochs`` of masked fine-tuning; or (``pruning="surgery"``, the
   paper's) dynamic network surgery along the same schedule: masks that follow the weights during the
   fine-tuning, cut weights that can grow back (:mod:`.surgery`).
2. **Focused quantization** of the pruned model: quantized weights held at their levels in steps
   (``fractions``: 25 / 50 / 75 / 87.5 / 100 %), ``quant_epochs`` of straight-through fine-tuning each
   (the last one ``final_epochs`` if set, ending at its epoch of best validation accuracy);
   with ``refit`` the mixture, assignments and exponent ranges are re-estimated from the current
   weights before every step after the first (the paper's periodic re-estimation). ``levels``,
   ``assignment`` and ``hardware`` choose the level set, argmax or sampled components and the
   multiplication-free variant (:mod:`.focused`).
3. **Baseline** (Deep Compression) on the same pruned model: k-means weight sharing at
   ``baseline_bits``, centroids fine-tuned for the same number of epochs as step 2 in total.
4. **Coding**: both models' codes and sparsity patterns with Huffman, ANS and zstd; sizes and ratios
   against fp32, for the whole model and for the coded layers alone (:mod:`.compress`).
5. **Controls** (``controls``, on by default): the pruned model fine-tuned for as many epochs as the
   quantized ones get (how much of the loss is the pruning's), and Deep Compression with its
   codebooks stored at fp16 (a sensitivity row: how much of a size gap is the codebooks' precision).

Every fine-tuning run checkpoints each epoch (the trainer's resumable state) and every finished stage
writes the model's state, so a killed pipeline resumes at its last epoch. Each stage file carries the
key of what made it (the float model's state, the data, the settings of this stage and of every stage
before it, the code; :mod:`cpq_lib.artefacts`): a run with other settings in the same folder
recomputes what differs instead of loading another run's models. Validation accuracy is
recorded along the way; the test split is read once per final model.
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from torch import nn
from torch.nn.utils import parametrize, prune

from ..artefacts import ArtefactKey, load_artefact, save_artefact, state_fingerprint
from ..config import TrainConfig
from ..quant.transform import calibrate_, excluded_names
from ..train import evaluate, train_model
from .compress import compression_table
from .focused import ASSIGNMENTS, DEFAULT_SEPARATION, check_bits, check_levels
from .executor import quantize_focused_inputs_
from .kmeans import SharedWeight, fit_codebook, quantize_with_codebook
from .pruning import (
    SCOPES, Sparsity, check_layer_sparsity, cubic_factors, magnitude_prune_, make_permanent_, prepare_masks_, pruned_names,
    scale_sparsity, sparsity_table,
)
from .surgery import fold_surgery_, prepare_surgery_, surgery_names, surgery_prune_
from .transform import focus_quantize_, focused_codes, focused_table, refit_, set_fraction_


PRUNING_METHODS = ("magnitude", "surgery")
HARDWARE_CALIBRATION_IMAGES = 512  # training images that calibrate the hardware variant's 8-bit inputs


@dataclass(frozen=True)
class CompressionConfig:
    sparsity: Sparsity = 0.8             # one target, or (fnmatch pattern, target) pairs (a dict is accepted)
    scope: str = "layer"
    pruning: str = "magnitude"           # magnitude | surgery (dynamic network surgery)
    prune_steps: int = 3
    prune_epochs: int = 1
    bits: int = 5
    levels: str = "paper"
    assignment: str = "argmax"
    hardware: bool = False
    refit: bool = True
    controls: bool = True                # pruned-only fine-tuning (same epochs) and Deep Compression with fp16 codebooks
    separation: float = DEFAULT_SEPARATION
    fractions: tuple[float, ...] = (0.25, 0.5, 0.75, 0.875, 1.0)
    quant_epochs: int = 1
    final_epochs: int | None = None      # the last incremental step's epochs, ending at its best validation epoch (None: quant_epochs)
    baseline_bits: int = 5
    exclude: tuple[str, ...] = ("@first", "@last")
    max_gap: int = 255
    seed: int = 0

    @property
    def quantization_epochs(self) -> int:
        """Epochs of the focused model's fine-tuning in all: the budget the baselines get too."""
        return self.quant_epochs * (len(self.fractions) - 1) + (self.final_epochs or self.quant_epochs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "sparsity", check_layer_sparsity(self.sparsity))
        if self.scope == "global" and isinstance(self.sparsity, tuple):
            raise ValueError("per-layer sparsities need scope 'layer' (a global threshold has one target)")
        check_bits(self.bits)
        check_levels(self.levels)
        if self.assignment not in ASSIGNMENTS:
            raise ValueError(f"assignment {self.assignment!r} is not allowed; choose one of {list(ASSIGNMENTS)}")
        if self.pruning not in PRUNING_METHODS:
            raise ValueError(f"pruning {self.pruning!r} is not allowed; choose one of {list(PRUNING_METHODS)}")
        if self.pruning == "surgery" and (self.scope != "layer" or self.prune_epochs < 1):
            raise ValueError("pruning 'surgery' needs scope 'layer' and prune_epochs >= 1 (its masks move during fine-tuning)")
        if self.scope not in SCOPES:
            raise ValueError(f"scope {self.scope!r} is not allowed; choose one of {list(SCOPES)}")
        if isinstance(self.baseline_bits, bool) or not isinstance(self.baseline_bits, int) or not 1 <= self.baseline_bits <= 8:
            raise ValueError(f"baseline_bits must be an integer from 1 to 8 (2 to 256 shared weights), got {self.baseline_bits!r}")
        if self.final_epochs is not None and (isinstance(self.final_epochs, bool) or not isinstance(self.final_epochs, int)
                                              or self.final_epochs < 1):
            raise ValueError(f"final_epochs must be a positive integer or None, got {self.final_epochs!r}")
        for name in ("prune_steps", "prune_epochs", "quant_epochs"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if name != "prune_epochs" else 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        fractions = tuple(self.fractions)
        if not fractions or any(not 0 < f <= 1 for f in fractions) or list(fractions) != sorted(set(fractions)) or fractions[-1] != 1:
            raise ValueError(f"fractions must rise within (0, 1] and end at 1, got {self.fractions!r}")


def _layer_names(model: nn.Module, exclude) -> list[str]:
    keep = excluded_names(model, exclude)
    return [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in keep]


# the code a stage's model depends on
STAGE_CODE = ("sparse", "train", "quant", "data", "models")


def stage_keys(model: nn.Module, data, config: CompressionConfig, train: TrainConfig) -> dict[str, ArtefactKey]:
    """Keys of the three stage families; focused and baseline extend the pruning key (they start from it)."""
    pruning = ArtefactKey.make("sparse/prune", {
        "model": state_fingerprint(model), "dataset": data.name, "val_digest": data.val_digest, "train": train,
        "sparsity": config.sparsity, "scope": config.scope, "pruning": config.pruning, "prune_steps": config.prune_steps,
        "prune_epochs": config.prune_epochs, "exclude": config.exclude, "seed": config.seed,
        "dtype": torch.get_default_dtype()}, STAGE_CODE)
    return {"prune": pruning,
            "focused": pruning.extend("sparse/focused", {"bits": config.bits, "separation": config.separation,
                                                         "fractions": config.fractions, "quant_epochs": config.quant_epochs,
                                                         "final_epochs": config.final_epochs,
                                                         "levels": config.levels, "assignment": config.assignment,
                                                         "hardware": config.hardware, "refit": config.refit}),
            "baseline": pruning.extend("sparse/deep-compression", {"baseline_bits": config.baseline_bits,
                                                                   "epochs": config.quantization_epochs,
                                                                   "best_epoch": config.final_epochs is not None}),
            "pruned-only": pruning.extend("sparse/pruned-only", {"epochs": config.quantization_epochs,
                                                                 "best_epoch": config.final_epochs is not None})}


def _fine_tune(model, data, train: TrainConfig, epochs: int, seed: int, device: str, state: Path, progress: bool,
               key: ArtefactKey, keep_best: bool = False) -> None:
    """Fine-tune, resumable; with ``keep_best`` the model ends at its epoch of best validation accuracy (kept in
    ``<state>.best``, which survives a kill with the accuracy it was chosen by; a kill between an epoch's
    checkpoint and that file's update loses that one epoch as a candidate)."""
    if not epochs:
        return
    best_path = state.with_suffix(".best")
    best_key = key.extend("sparse/best-epoch", {"epochs": epochs, "seed": seed})
    best = load_artefact(best_path, best_key) if keep_best else None

    def remember(record: dict) -> None:
        nonlocal best
        if best is None or record["val_accuracy"] > best["val_accuracy"]:
            best = {"val_accuracy": record["val_accuracy"], "epoch": record["epoch"],
                    "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
            save_artefact(best, best_path, best_key)

    train_model(model, data, dataclasses.replace(train, epochs=epochs), seed=seed, device=device, state_path=state,
                progress=progress, state_key={"stage": state.stem, "artefact": key.digest}, restart_stale=True,
                on_epoch=remember if keep_best else None)
    if keep_best and best is not None:
        model.load_state_dict(best["state"])


def _trained_stage(model: nn.Module, stem: Path, key: ArtefactKey, data, train: TrainConfig, config: "CompressionConfig",
                   seed: int, device: str, progress: bool) -> None:
    """A baseline or control fine-tuned for the focused model's epoch budget: loaded from ``<stem>.pt`` when made
    under ``key``, else trained (resumable from ``<stem>.state``) and saved."""
    state = load_artefact(stem.with_suffix(".pt"), key)
    if state is not None:
        model.load_state_dict(state)
        return
    _fine_tune(model, data, train, config.quantization_epochs, seed, device, stem.with_suffix(".state"), progress, key,
               keep_best=config.final_epochs is not None)
    save_artefact(model.state_dict(), stem.with_suffix(".pt"), key)


def _sparsity_of(model: nn.Module, names: list[str], target: Sparsity, measured: bool = False) -> float:
    """The stage table's sparsity: the target where it is one number (magnitude pruning meets it exactly),
    else (per-layer targets, surgery) the measured share over the quantized layers."""
    if not isinstance(target, tuple) and not measured:
        return target
    table = sparsity_table(model).set_index("layer").loc[names]
    return float(table["zeros"].sum() / table["weights"].sum())


def _accuracy(model, data, split: str, device: str) -> float:
    return evaluate(model, data.eval_loader(split), data.num_classes, device).accuracy


def compress_model(model: nn.Module, data, config: CompressionConfig, train: TrainConfig, run_dir: str | Path,
                   device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Run the pipeline on a copy of the trained float ``model``; returns stages, tables and final accuracies."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    names = _layer_names(model, config.exclude)
    patterns = tuple(n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear)) and n not in names)
    stages = [{"stage": "float", "sparsity": 0.0, "val_accuracy": _accuracy(model, data, "val", device)}]
    keys = stage_keys(model, data, config, train)

    pruned = copy.deepcopy(model)
    for step, factor in enumerate(cubic_factors(config.prune_steps), start=1):
        target = scale_sparsity(config.sparsity, factor)
        done, key = run_dir / f"prune-{step}.pt", keys["prune"].extend("sparse/prune", {"step": step})
        state = load_artefact(done, key)
        if state is not None:
            prepare_masks_(pruned, pruned_names(state))
            prepare_surgery_(pruned, surgery_names(state))
            pruned.load_state_dict(state)
        else:
            if config.pruning == "surgery":
                surgery_prune_(pruned, target, exclude=patterns)
            else:
                magnitude_prune_(pruned, target, config.scope, exclude=patterns)
            _fine_tune(pruned, data, train, config.prune_epochs, config.seed + step, device, run_dir / f"prune-{step}.state",
                       progress, key)
            save_artefact(pruned.state_dict(), done, key)
        stages.append({"stage": f"pruned {step}/{config.prune_steps}", "sparsity": _sparsity_of(pruned, names, target, config.pruning == "surgery"),
                       "val_accuracy": _accuracy(pruned, data, "val", device)})
    fold_surgery_(pruned)
    make_permanent_(pruned)
    final_sparsity = _sparsity_of(pruned, names, config.sparsity, config.pruning == "surgery")

    focused = copy.deepcopy(pruned)
    focus_quantize_(focused, config.bits, config.separation, config.fractions[0], config.exclude, config.seed,
                    config.levels, config.assignment, config.hardware)
    if config.hardware:  # multiplication-free inference needs integer inputs: the paper's 8-bit activations
        quantize_focused_inputs_(focused, bits=8)
        calibrate_(focused, data.calibration_loader(HARDWARE_CALIBRATION_IMAGES, seed=config.seed), device)
    for index, fraction in enumerate(config.fractions, start=1):
        done, key = run_dir / f"focused-{index}.pt", keys["focused"].extend("sparse/focused", {"step": index})
        if config.refit and index > 1:  # from the weights the previous step left (loaded from its file on resume)
            refit_(focused)
        set_fraction_(focused, fraction)
        state = load_artefact(done, key)
        if state is not None:
            focused.load_state_dict(state)
        else:
            last = index == len(config.fractions) and config.final_epochs is not None
            _fine_tune(focused, data, train, config.final_epochs if last else config.quant_epochs, config.seed + 100 + index,
                       device, run_dir / f"focused-{index}.state", progress, key, keep_best=last)
            save_artefact(focused.state_dict(), done, key)
        stages.append({"stage": f"focused {fraction:.3g}", "sparsity": final_sparsity,
                       "val_accuracy": _accuracy(focused, data, "val", device)})

    layers = focused_table(focused)  # the final layouts (after every re-estimation)
    baseline = copy.deepcopy(pruned)
    for name in names:
        module = baseline.get_submodule(name)
        codebook = fit_codebook(module.weight, config.baseline_bits, config.seed)
        codes, _ = quantize_with_codebook(module.weight, codebook)
        parametrize.register_parametrization(module, "weight", SharedWeight(codes, codebook))
    _trained_stage(baseline, run_dir / "baseline", keys["baseline"], data, train, config, config.seed + 200, device, progress)
    stages.append({"stage": f"deep compression {config.baseline_bits}-bit", "sparsity": final_sparsity,
                   "val_accuracy": _accuracy(baseline, data, "val", device)})

    models = {"float": model, "focused": focused, "deep compression": baseline}
    tables = [compression_table(focused, focused_codes(focused), max_gap=config.max_gap).assign(method="focused"),
              compression_table(baseline, _codebook_codes(baseline, names), max_gap=config.max_gap).assign(method="deep compression")]
    if config.controls:
        # pruning alone, fine-tuned as long as the quantized models: how much of the loss is the pruning's
        control = copy.deepcopy(pruned)
        for name in names:  # masked fine-tuning: its zeros stay zeros
            weight = control.get_submodule(name).weight
            prune.custom_from_mask(control.get_submodule(name), "weight", (weight != 0).to(weight.dtype))
        _trained_stage(control, run_dir / "pruned-only", keys["pruned-only"], data, train, config, config.seed + 300, device,
                       progress)
        stages.append({"stage": f"pruned only, +{config.quantization_epochs} epochs", "sparsity": final_sparsity,
                       "val_accuracy": _accuracy(control, data, "val", device)})
        # Deep Compression's codebooks at fp16 instead of fp32 (a sensitivity row of the size comparison)
        half = copy.deepcopy(baseline)
        for name in names:
            half.get_submodule(name).parametrizations.weight[0].to_fp16_codebook_()
        stages.append({"stage": f"deep compression {config.baseline_bits}-bit, fp16 codebooks", "sparsity": final_sparsity,
                       "val_accuracy": _accuracy(half, data, "val", device)})
        tables.append(compression_table(half, _codebook_codes(half, names), max_gap=config.max_gap)
                      .assign(method="deep compression fp16 codebooks"))
        make_permanent_(control)
        models.update({"pruned only": control, "deep compression fp16 codebooks": half})
    return {"config": dataclasses.asdict(config), "train": dataclasses.asdict(train), "stages": pd.DataFrame(stages),
            "layers": layers, "sizes": pd.concat(tables, ignore_index=True), "models": models,
            "test_accuracy": {method: _accuracy(m, data, "test", device) for method, m in models.items()}}


def _codebook_codes(model: nn.Module, names: list[str]) -> dict[str, tuple[torch.Tensor, int]]:
    shared = {name: model.get_submodule(name).parametrizations.weight[0] for name in names}
    return {name: (param.codes.cpu(), param.header_bits) for name, param in shared.items()}


RESULT_TABLES = ("stages", "layers", "sizes")


def save_results(result: dict[str, Any], folder: str | Path, extra: dict[str, Any] | None = None) -> Path:
    """Write the tables as CSV and config, test accuracies and ``extra`` as summary.json (atomically)."""
    from ..fileio import atomic_write_json, atomic_write_text

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name in RESULT_TABLES:
        atomic_write_text(result[name].to_csv(index=False), folder / f"{name}.csv")
    summary = {"config": result["config"], "train": result["train"], "test_accuracy": result["test_accuracy"], **(extra or {})}
    atomic_write_json(summary, folder / "summary.json")
    return folder


def load_results(folder: str | Path) -> dict[str, Any]:
    """What :func:`save_results` wrote (no models)."""
    import json

    folder = Path(folder)
    missing = [f"{n}.csv" for n in RESULT_TABLES if not (folder / f"{n}.csv").is_file()]
    if missing or not (folder / "summary.json").is_file():
        raise FileNotFoundError(f"{folder}: not a saved compression result (missing {missing or ['summary.json']})")
    result = {name: pd.read_csv(folder / f"{name}.csv") for name in RESULT_TABLES}
    result.update(json.loads((folder / "summary.json").read_text()))
    return result
