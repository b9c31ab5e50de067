"""Tables that notebooks and reports show about plans and comparisons."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from ..classpath import ClassScores
from ..quant import BitPlan


def plan_digest(plan: BitPlan | dict) -> str:
    """A short fingerprint of a plan's bit-widths (to compare plans, key refinement states, check in nbval)."""
    layers = plan.to_dict()["layers"] if isinstance(plan, BitPlan) else plan["layers"]
    return hashlib.sha256(json.dumps(layers, sort_keys=True).encode()).hexdigest()[:16]


def bits_per_layer(plan: BitPlan) -> pd.DataFrame:
    """Per layer, in plan order: mean bits and channels at each bit-width used anywhere in the plan."""
    rows = []
    for name, layer in plan.layers.items():
        counts = pd.Series(layer.weight).value_counts()
        rows.append({"layer": name, "mean_bits": sum(layer.weight) / len(layer.weight),
                     **{f"{b} bits": int(counts.get(b, 0)) for b in range(17)}})
    frame = pd.DataFrame(rows).set_index("layer")
    return frame[[c for c in frame.columns if c == "mean_bits" or frame[c].sum() > 0]]


def bits_and_class_counts(plan: BitPlan, scores: ClassScores) -> pd.DataFrame:
    """One row per quantized channel: layer, channel, class count (sum of its class scores), bits."""
    frames = [pd.DataFrame({"layer": name, "channel": range(len(layer.weight)),
                            "class count": scores.scores[name].double().sum(0).numpy(), "bits": layer.weight})
              for name, layer in plan.layers.items()]
    return pd.concat(frames, ignore_index=True)


def class_bits_table(details: dict) -> pd.DataFrame:
    """A class-path search's bits per (pseudo-)class, in search order."""
    return pd.DataFrame({"class": list(details["class_bits"]), "bits": list(details["class_bits"].values())})


def comparison_table(frame: pd.DataFrame, value: str = "test_after") -> pd.DataFrame:
    """Per target and allocator: runs, mean and standard deviation (over seeds) of ``value``, mean
    average bits, BitOPs, evaluations and search seconds."""
    grouped = frame.groupby(["target", "allocator"])
    table = grouped.agg(runs=(value, "size"), mean=(value, "mean"), std=(value, "std"),
                        average_bits=("average_bits", "mean"), bitops=("bitops", "mean"),
                        evaluations=("evaluations", "mean"), search_seconds=("search_seconds", "mean"))
    return table.reset_index()
