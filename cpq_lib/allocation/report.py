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


TARGET_ORDER = ("W2A2", "W3A3", "W4A4")


def _cell(mean: float, std: float, runs: int) -> str:
    return f"{100 * mean:.2f}" if runs < 2 or pd.isna(std) else f"{100 * mean:.2f} ± {100 * std:.2f}"


def markdown_comparison(frame: pd.DataFrame) -> str:
    """The comparison as a Markdown table (the README's): per target and allocator, test accuracy after
    refinement (mean ± std over seeds, %), before refinement, validation after, average bits, BitOPs and
    search cost; then per target ``classpath`` minus the best other allocator by mean test accuracy."""
    rows = ["| target | allocator | seeds | test after (%) | test before (%) | val after (%) | avg bits | GBitOPs "
            "| evaluations | search s |", "|---|---|---|---|---|---|---|---|---|---|"]
    grouped = frame.groupby(["target", "allocator"])
    stats = grouped.agg(runs=("test_after", "size"), test=("test_after", "mean"), test_std=("test_after", "std"),
                        before=("test_before", "mean"), before_std=("test_before", "std"),
                        val=("val_after", "mean"), val_std=("val_after", "std"), bits=("average_bits", "mean"),
                        bitops=("bitops", "mean"), evaluations=("evaluations", "mean"),
                        seconds=("search_seconds", "mean")).reset_index()
    order = {t: i for i, t in enumerate(TARGET_ORDER)}
    stats = stats.sort_values(["target", "test"], key=lambda c: c.map(order) if c.name == "target" else -c)
    deltas = []
    for target, part in stats.groupby("target", sort=False):
        for r in part.itertuples():
            rows.append(f"| {target} | {r.allocator} | {r.runs} | {_cell(r.test, r.test_std, r.runs)} "
                        f"| {_cell(r.before, r.before_std, r.runs)} | {_cell(r.val, r.val_std, r.runs)} | {r.bits:.3f} "
                        f"| {r.bitops / 1e9:.3f} | {r.evaluations:.0f} | {r.seconds:.0f} |")
        others = part[part["allocator"] != "classpath"]
        if "classpath" in set(part["allocator"]) and len(others):
            best = others.loc[others["test"].idxmax()]
            mine = float(part.loc[part["allocator"] == "classpath", "test"].iloc[0])
            deltas.append(f"{target}: classpath − best other ({best['allocator']}) = {100 * (mine - best['test']):+.2f} points")
    return "\n".join(rows) + ("\n\n" + "; ".join(deltas) + "." if deltas else "") + "\n"


COMPARISON_COLUMNS = ("target", "allocator", "test_after", "test_before", "val_after", "average_bits", "bitops",
                      "evaluations", "search_seconds")
NUMERIC_COLUMNS = COMPARISON_COLUMNS[2:]


def read_results(path: str) -> pd.DataFrame:
    """A sweep's results CSV, checked; ValueError naming the file and what is wrong with it."""
    from pathlib import Path

    csv = Path(path)
    if csv.is_dir():
        raise ValueError(f"{csv} is a folder; give a sweep's results.csv (in the sweep's --out folder)")
    if not csv.is_file():
        raise ValueError(f"{csv}: no such file")
    try:
        frame = pd.read_csv(csv)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{csv} is empty: the sweep finished no run (see its jobs/ logs)") from None
    except (pd.errors.ParserError, UnicodeDecodeError) as exc:
        raise ValueError(f"{csv} is not a CSV file ({exc})") from None
    missing = [c for c in COMPARISON_COLUMNS if c not in frame.columns]
    if missing:
        raise ValueError(f"{csv} is not a sweep's results table: it lacks the columns {missing}")
    if frame.empty:
        raise ValueError(f"{csv} has no runs: the sweep finished none yet (see its jobs/ logs)")
    for column in NUMERIC_COLUMNS:
        values = pd.to_numeric(frame[column], errors="coerce")
        bad = frame.loc[values.isna() & frame[column].notna(), column]
        if len(bad):
            raise ValueError(f"{csv}: column {column!r} holds non-numeric values, e.g. {bad.iloc[0]!r} (row {bad.index[0] + 2})")
        frame[column] = values
    return frame


def main(argv: list[str] | None = None) -> int:
    """``python -m cpq_lib.allocation results.csv``: print the Markdown comparison of a sweep's CSV."""
    import argparse
    import sys

    parser = argparse.ArgumentParser(prog="python -m cpq_lib.allocation", description=main.__doc__)
    parser.add_argument("csv", help="a sweep's results.csv")
    args = parser.parse_args(argv)
    try:
        frame = read_results(args.csv)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_comparison(frame), end="")
    return 0
