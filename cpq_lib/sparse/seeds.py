"""Reading the compression pipeline over seeds: each method's test accuracy and compression ratio with a
confidence interval, and the contrasts named in advance paired by seed.

A seed fixes the pipeline's whole random state (pruning fine-tuning, mixture fits, k-means, every data
order), and within one seed focused quantization, Deep Compression and the pruned-only control start
from the same pruned model with the same fine-tuning budget; so a difference is taken per seed and
summarised by its mean and Student-t interval (:mod:`cpq_lib.statistics`). The contrasts answer the
study's questions: does focused quantization beat Deep Compression (``focused - deep compression``),
and what does quantizing cost beyond pruning (``focused - pruned only``, ``deep compression - pruned only``).
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import pandas as pd

from ..statistics import mean_interval, paired_difference

# (arm, baseline): the study's questions, fixed before any result is read
CONTRASTS = (("focused", "deep compression"), ("focused", "pruned only"), ("deep compression", "pruned only"))


def _check_alike(results: Sequence[Mapping[str, Any]]) -> None:
    """Refuses runs whose settings differ in anything but the seed, and repeated seeds."""
    if not results:
        raise ValueError("results: give at least one saved compression result")
    settings = [({k: v for k, v in r["config"].items() if k != "seed"}, r["train"]) for r in results]
    for index, other in enumerate(settings[1:], start=1):
        for part, name in ((0, "config"), (1, "train")):
            differing = sorted(k for k in set(settings[0][part]) | set(other[part]) if settings[0][part].get(k) != other[part].get(k))
            if differing:
                raise ValueError(f"results 0 and {index} differ in {name} {differing}: only the seed may differ between runs read together")
    seeds = [int(r["config"]["seed"]) for r in results]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"results repeat a seed ({seeds}): each seed once")


def _row(interval) -> dict[str, float]:
    return {"mean": interval.mean, "ci_low": interval.low, "ci_high": interval.high}


def accuracy_over_seeds(results: Sequence[Mapping[str, Any]], level: float = 0.95) -> pd.DataFrame:
    """Per method: test top-1 (points) mean and interval over seeds, and each seed's value."""
    _check_alike(results)
    methods = list(dict.fromkeys(m for r in results for m in r["test_accuracy"]))
    rows = []
    for method in methods:
        values = [100 * r["test_accuracy"][method] for r in results if method in r["test_accuracy"]]
        rows.append({"method": method, "seeds": len(values), **_row(mean_interval(values, level)),
                     "per_seed": " / ".join(f"{v:.2f}" for v in values)})
    return pd.DataFrame(rows)


def ratios_over_seeds(results: Sequence[Mapping[str, Any]], level: float = 0.95) -> pd.DataFrame:
    """Per method and coder: the whole model's ratio against fp32 and the coded layers' alone, mean and interval."""
    _check_alike(results)
    totals = pd.concat([r["sizes"][r["sizes"]["layer"] == "total"] for r in results])
    rows = []
    for (method, coder), group in totals.groupby(["method", "coder"], sort=False):
        row = {"method": method, "coder": coder, "seeds": len(group), "bits": float(group["bits"].mean())}
        row.update({f"ratio_{k}": v for k, v in _row(mean_interval(group["ratio"], level)).items()})
        if "coded_layers_ratio" in group:
            row.update({f"coded_layers_ratio_{k}": v for k, v in _row(mean_interval(group["coded_layers_ratio"], level)).items()})
        rows.append(row)
    return pd.DataFrame(rows)


def contrasts_over_seeds(results: Sequence[Mapping[str, Any]], level: float = 0.95, coder: str = "ans",
                         contrasts: Sequence[tuple[str, str]] = CONTRASTS) -> pd.DataFrame:
    """Per contrast: test top-1 difference (points) paired by seed, and the whole-model ratio difference with
    ``coder`` where both arms are coded (the pruned-only control is not)."""
    _check_alike(results)
    rows = []
    for arm, baseline in contrasts:
        paired = [r for r in results if arm in r["test_accuracy"] and baseline in r["test_accuracy"]]
        if not paired:
            continue
        accuracy = paired_difference([100 * r["test_accuracy"][arm] for r in paired],
                                     [100 * r["test_accuracy"][baseline] for r in paired], level)
        row = {"arm": arm, "baseline": baseline, "pairs": len(paired), **{f"accuracy_{k}": v for k, v in _row(accuracy).items()}}
        ratios = [_ratio(r, arm, coder) for r in paired], [_ratio(r, baseline, coder) for r in paired]
        if all(v is not None for v in (*ratios[0], *ratios[1])):
            row.update({f"ratio_{k}": v for k, v in _row(paired_difference(*ratios, level)).items()})
        row["ahead"] = sum(r["test_accuracy"][arm] > r["test_accuracy"][baseline] for r in paired)
        rows.append(row)
    return pd.DataFrame(rows)


def stages_over_seeds(results: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Validation accuracy along the pipeline, the mean over seeds per stage (the shape ``plots.pipeline_accuracy`` draws)."""
    _check_alike(results)
    stages = pd.concat([r["stages"].assign(order=range(len(r["stages"]))) for r in results])
    means = stages.groupby("stage", sort=False).agg(order=("order", "first"), sparsity=("sparsity", "mean"),
                                                     val_accuracy=("val_accuracy", "mean"), seeds=("val_accuracy", "size"))
    return means.sort_values("order").drop(columns="order").reset_index()


def _ratio(result: Mapping[str, Any], method: str, coder: str) -> float | None:
    sizes = result["sizes"]
    row = sizes[(sizes["layer"] == "total") & (sizes["method"] == method) & (sizes["coder"] == coder)]
    return None if row.empty else float(row["ratio"].iloc[0])
