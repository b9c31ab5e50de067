"""Post-training sweeps used by the notebooks: quantization error and accuracy vs bits and granularity."""

from __future__ import annotations

import copy
import dataclasses
from typing import Iterable, Sequence

import pandas as pd
from torch import nn

from ..progress import progress as progress_bar
from ..quant.analysis import weight_errors
from ..quant.metrics import model_summary
from ..quant.transform import QuantConfig, calibrate_, quantize_
from ..train import evaluate


def granularity_sweep(model: nn.Module, data, bits: Sequence[int], configs: dict[str, QuantConfig],
                      calibration: Iterable, device: str = "cpu", split: str = "val",
                      progress: bool = True) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Quantize a copy of ``model`` for every (configuration, bit-width): per-layer errors and accuracy.

    ``configs`` maps a label to a QuantConfig whose ``weight_bits`` is overridden by each entry of
    ``bits``. Accuracy is measured on ``split`` (validation by default: this is analysis, not a report).
    """
    if split == "test":
        raise ValueError("granularity_sweep is analysis: measure on 'val' (or 'train'), never 'test'")
    example = next(iter(data.eval_loader(split, batch_size=1)))[0].to(device)
    calibration = list(calibration)
    error_rows, accuracy_rows = [], []
    jobs = [(label, b) for label in configs for b in bits]
    for label, b in progress_bar(jobs, progress, desc="sweep"):
        config = dataclasses.replace(configs[label], weight_bits=b)
        quantized = quantize_(copy.deepcopy(model).to(device), config).eval()
        calibrate_(quantized, calibration, device)
        errors = weight_errors(quantized).assign(config=label, bits=b)
        error_rows.append(errors)
        result = evaluate(quantized, data.eval_loader(split), data.num_classes, device)
        summary = model_summary(quantized, example)
        accuracy_rows.append({"config": label, "bits": b, "accuracy": result.accuracy, "loss": result.loss,
                              "size_bytes": summary["size_bytes"], "bitops": summary["bitops"],
                              "scales": int(errors["scales"].sum())})
    return pd.concat(error_rows, ignore_index=True), pd.DataFrame(accuracy_rows)
