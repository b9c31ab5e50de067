"""Tables that notebooks and reports show about plans and comparisons."""

from __future__ import annotations

import hashlib
import json

import pandas as pd

from ..classpath import ClassScores
from ..quant import BitPlan
from ..statistics import Interval, mcnemar, mean_interval, paired_difference, unpack_correct


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
    """One row per quantized channel: layer, channel, class count (the reference's order where the scores
    hold it, else the sum of the class scores), bits."""
    counts = scores.class_count("reference" if scores.position_counts is not None else "sum_of_maxima")
    frames = [pd.DataFrame({"layer": name, "channel": range(len(layer.weight)),
                            "class count": counts[name].double().numpy(), "bits": layer.weight})
              for name, layer in plan.layers.items()]
    return pd.concat(frames, ignore_index=True)


def class_bits_table(details: dict) -> pd.DataFrame:
    """A class-path search's bits per (pseudo-)class, in search order."""
    return pd.DataFrame({"class": list(details["class_bits"]), "bits": list(details["class_bits"].values())})


def comparison_table(frame: pd.DataFrame, value: str = "test_after", level: float = 0.95) -> pd.DataFrame:
    """Per target and allocator: runs, mean, standard deviation and the ``level`` confidence interval (over
    seeds, Student-t) of ``value``, mean average bits, BitOPs, evaluations and search seconds."""
    rows = []
    for (target, allocator), part in frame.groupby(["target", "allocator"], sort=False):
        interval = mean_interval(part[value], level)
        rows.append({"target": target, "allocator": allocator, "runs": len(part), "mean": interval.mean,
                     "std": float(part[value].std()) if len(part) > 1 else float("nan"),
                     "ci_low": interval.low, "ci_high": interval.high,
                     "average_bits": float(part["average_bits"].mean()), "bitops": float(part["bitops"].mean()),
                     "evaluations": float(part["evaluations"].mean()), "search_seconds": float(part["search_seconds"].mean())})
    return pd.DataFrame(rows)


TARGET_ORDER = ("W2A2", "W3A3", "W4A4")
BUDGET_TOLERANCE = 0.01  # arms at one point must spend the same bits to within this, or the row is flagged
# the pre-specified contrasts (arm, baseline), named before the results: the class ingredient against the
# strongest non-class baselines and against its own ablation
CLASS_PATH_CONTRASTS = tuple((arm, base) for arm in ("classpath", "classpath_cpq")
                             for base in ("uniform", "sensitivity", "classpath_random_paths"))
# the Hessian-aware arms and the AIMET peer against uniform and the reference ClassPathQ, and the class
# weighting of the traces against its equal-weight ablation
HESSIAN_CONTRASTS = tuple((arm, base) for arm in ("hawq", "hawq_channel", "hawq_class", "aimet")
                          for base in ("uniform", "classpath")) + (("hawq_class", "hawq_channel"),)
CONTRASTS = CLASS_PATH_CONTRASTS + HESSIAN_CONTRASTS  # each applies where both of its arms ran


def _cell(interval: Interval) -> str:
    if interval.n == 0:
        return "–"
    if interval.n < 2:
        return f"{100 * interval.mean:.2f}"
    return f"{100 * interval.mean:.2f} ± {100 * interval.half_width:.2f}"


def _target_key(column: pd.Series) -> pd.Series:
    order = {t: i for i, t in enumerate(TARGET_ORDER)}
    return column.map(lambda t: order.get(t, len(order)))


def markdown_comparison(frame: pd.DataFrame, records: dict[str, dict] | None = None, level: float = 0.95) -> str:
    """The comparison as Markdown: per point and arm, mean ± the ``level`` CI half-width over seeds (%) of test
    accuracy after and before refinement and of validation accuracy after, average bits (flagged † when an
    arm spends more than 0.01 bits less than the point's highest), GBitOPs and search cost; then each
    pre-specified contrast (:data:`CONTRASTS`) as a paired difference over seeds with its CI and, when the
    runs' records are given (``records``: run name -> record), an exact McNemar test per seed."""
    rows = ["| target | allocator | seeds | test after (%) | test before (%) | val after (%) | avg bits | GBitOPs "
            "| evaluations | search s |", "|---|---|---|---|---|---|---|---|---|---|"]
    flagged = False
    frame = frame.sort_values("target", key=_target_key, kind="stable")
    for target, part in frame.groupby("target", sort=False):
        cells = []
        for allocator, runs in part.groupby("allocator", sort=False):
            cells.append((mean_interval(runs["test_after"], level).mean, allocator, runs))
        highest = part.groupby("allocator")["average_bits"].mean().max()
        for _, allocator, runs in sorted(cells, key=lambda c: -c[0]):
            bits = float(runs["average_bits"].mean())
            flag = " †" if highest - bits > BUDGET_TOLERANCE + 1e-12 else ""
            flagged = flagged or bool(flag)
            rows.append(f"| {target} | {allocator} | {len(runs)} | {_cell(mean_interval(runs['test_after'], level))} "
                        f"| {_cell(mean_interval(runs['test_before'], level))} | {_cell(mean_interval(runs['val_after'], level))} "
                        f"| {bits:.3f}{flag} | {runs['bitops'].mean() / 1e9:.3f} | {runs['evaluations'].mean():.0f} "
                        f"| {runs['search_seconds'].mean():.0f} |")
    text = "\n".join(rows) + "\n"
    if flagged:
        text += f"\n† spends more than {BUDGET_TOLERANCE} bits less than the point's highest arm: not an equal budget.\n"
    lines = contrast_table(frame, records, level)
    if len(lines):
        text += ("\n| target | contrast | paired seeds | difference, test after (points) | 95% CI | McNemar p per seed |\n"
                 "|---|---|---|---|---|---|\n")
        for r in lines.itertuples():
            ci = "–" if pd.isna(r.ci_low) else f"[{100 * r.ci_low:+.2f}, {100 * r.ci_high:+.2f}]"
            p = "–" if not r.mcnemar_p else ", ".join(f"{v:.2g}" for v in r.mcnemar_p)
            text += f"| {r.target} | {r.arm} − {r.baseline} | {r.pairs} | {100 * r.difference:+.2f} | {ci} | {p} |\n"
    return text


def contrast_table(frame: pd.DataFrame, records: dict[str, dict] | None = None, level: float = 0.95,
                   contrasts=CONTRASTS, value: str = "test_after") -> pd.DataFrame:
    """Each contrast (arm, baseline) at each point, paired by seed: the mean difference of ``value`` with
    its CI, and the per-seed McNemar p-values over the test images (when ``records`` hold them)."""
    out = []
    for target, part in frame.groupby("target", sort=False):
        for arm, base in contrasts:
            a = part[part["allocator"] == arm].set_index("seed")
            b = part[part["allocator"] == base].set_index("seed")
            seeds = sorted(set(a.index) & set(b.index))
            if not seeds:
                continue
            interval = paired_difference(a.loc[seeds, value].to_numpy(), b.loc[seeds, value].to_numpy(), level)
            p_values = []
            if records is not None and "run" in part.columns:
                for seed in seeds:
                    ra, rb = records.get(a.loc[seed, "run"]), records.get(b.loc[seed, "run"])
                    if ra is None or rb is None:
                        continue
                    try:
                        test = mcnemar(unpack_correct(ra["results"]["after_refinement"]["test_correct"]),
                                       unpack_correct(rb["results"]["after_refinement"]["test_correct"]))
                    except KeyError:  # records written before per-image correctness was kept
                        continue
                    p_values.append(test.p_value)
            out.append({"target": target, "arm": arm, "baseline": base, "pairs": len(seeds), "difference": interval.mean,
                        "ci_low": interval.low, "ci_high": interval.high, "mcnemar_p": p_values})
    return pd.DataFrame(out, columns=["target", "arm", "baseline", "pairs", "difference", "ci_low", "ci_high", "mcnemar_p"])


def percent_view(table: pd.DataFrame) -> pd.DataFrame:
    """A :func:`comparison_table` for reading: test accuracy and its 95% CI half-width in points, GBitOPs."""
    return table.assign(**{"test (%)": 100 * table["mean"], "± (95% CI)": 50 * (table["ci_high"] - table["ci_low"]),
                           "GBitOPs": table["bitops"] / 1e9})


def contrast_view(contrasts: pd.DataFrame) -> pd.DataFrame:
    """A :func:`contrast_table` for reading: differences and CIs in points, McNemar p-values as one string."""
    return contrasts.assign(difference=100 * contrasts["difference"], ci_low=100 * contrasts["ci_low"],
                            ci_high=100 * contrasts["ci_high"],
                            mcnemar_p=contrasts["mcnemar_p"].map(lambda ps: ", ".join(f"{p:.2f}" for p in ps)))


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
    parser.add_argument("--records", help="a folder of the runs' record JSON files (<run>.json, or <run>/record.json): "
                                          "adds McNemar tests over the test images")
    parser.add_argument("--level", type=float, default=0.95, help="confidence level of the intervals (default 0.95)")
    args = parser.parse_args(argv)
    try:
        if not 0 < args.level < 1:
            raise ValueError(f"--level must lie in (0, 1), got {args.level}")
        frame = read_results(args.csv)
        records = read_records(args.records, frame) if args.records else None
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(markdown_comparison(frame, records, args.level), end="")
    return 0


def read_records(folder: str, frame: pd.DataFrame) -> dict[str, dict]:
    """Records of the CSV's runs from ``folder`` (``<run>.json`` or ``<run>/record.json``); ValueError if absent."""
    from pathlib import Path

    root = Path(folder)
    if not root.is_dir():
        raise ValueError(f"--records {root}: no such folder")
    if "run" not in frame.columns:
        raise ValueError("the results CSV has no 'run' column to match records by")
    records = {}
    for run in frame["run"]:
        for path in (root / f"{run}.json", root / run / "record.json"):
            if path.is_file():
                try:
                    record = json.loads(path.read_text(encoding="utf-8"))
                except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                    raise ValueError(f"{path} is not a run record ({exc})") from None
                if not isinstance(record, dict) or "results" not in record:
                    raise ValueError(f"{path} is not a run record: it has no 'results'")
                records[run] = record
                break
    if not records:
        raise ValueError(f"--records {root}: none of the CSV's {len(frame)} runs has a record there")
    return records
