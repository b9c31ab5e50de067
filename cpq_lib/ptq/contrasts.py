"""Reading a PTQ-SL study over calibration seeds: paired contrasts with confidence intervals, a layout chosen on
validation, the test split read once.

A seed fixes the calibration images (and the search's sampled positions), so every configuration of
one seed shares them: differences are taken per seed (reordered - plain at the same layout, chosen
layout - channel-wise) and summarised by their mean and a 95% Student-t interval over seeds. The
claim "reordered sub-layerwise beats channel-wise with no more scales" is answered without picking
the best of many layouts on the split it is reported on: :func:`choose_layouts` picks, per target,
search setting and reordering, the layout with the best mean *validation* accuracy among those with
no more scales than channel-wise, and :func:`evaluate_chosen` rebuilds those configurations (and
channel-wise) and reads the test split for them only.
"""

from __future__ import annotations

from typing import Callable, Sequence

import pandas as pd
from torch import nn

from ..statistics import mean_interval
from ..train import evaluate
from .search import ScaleSearchConfig
from .study import LAYOUTS, markdown_report, parse_target, ptqsl_study, run_configuration


CONFIGURATION = ["target", "granularity", "reorder", "search"]


def mean_over_seeds(results: pd.DataFrame) -> pd.DataFrame:
    """One row per configuration: accuracies and search measures averaged over the seeds, a ``seeds`` count;
    what tables and figures made for one study read (a table without a ``seed`` column comes back as is)."""
    if "seed" not in results.columns:
        return results
    averaged = [c for c in results.columns if c.endswith("_accuracy") or c in ("search_seconds", "metric_start", "metric_end")]
    rest = [c for c in results.columns if c not in (*CONFIGURATION, *averaged, "seed")]
    grouped = results.groupby(CONFIGURATION, sort=False, as_index=False, dropna=False)
    means = grouped.agg(**{c: (c, "mean") for c in averaged}, **{c: (c, "first") for c in rest}, seeds=("seed", "nunique"))
    return means[[c for c in results.columns if c != "seed"] + ["seeds"]]


def study_over_seeds(model: nn.Module, data, targets: Sequence[str], calibration_for: Callable[[int], list], seeds: Sequence[int],
                     out_stem: str | None = None, search: ScaleSearchConfig | None = None, **study) -> pd.DataFrame:
    """:func:`ptqsl_study` once per seed (its own calibration images and search seed, its own resumable CSV
    ``<out_stem>-s<seed>.csv``), the rows stacked with a ``seed`` column."""
    if not seeds:
        raise ValueError("seeds: give at least one")
    search = search or ScaleSearchConfig()
    tables = []
    for seed in seeds:
        seeded = ScaleSearchConfig(**{**search.__dict__, "seed": int(seed)})
        out = None if out_stem is None else f"{out_stem}-s{seed}.csv"
        tables.append(ptqsl_study(model, data, targets, calibration_for(int(seed)), search=seeded, out=out, **study).assign(seed=int(seed)))
    return pd.concat(tables, ignore_index=True)


def reordering_contrasts(results: pd.DataFrame, accuracy: str = "val_accuracy") -> pd.DataFrame:
    """Per target, search setting, layout and reordering: reordered - plain at the same layout, paired by seed
    (points), with metadata bits beside it."""
    rows = []
    keys = ["target", "search", "granularity"]
    plain = results[results["reorder"] == "none"].set_index([*keys, "seed"])
    for (target, searched, layout, reorder), group in results[results["reorder"] != "none"].groupby([*keys, "reorder"]):
        differences = [100 * (r[accuracy] - plain.loc[(target, searched, layout, r["seed"]), accuracy])
                       for _, r in group.iterrows() if (target, searched, layout, r["seed"]) in plain.index]
        if not differences:
            continue
        interval = mean_interval(differences)
        row = {"target": target, "search": bool(searched), "granularity": layout, "reorder": reorder,
               "scales": int(group["scales"].iloc[0]), "seeds": len(differences), "difference": interval.mean, "ci_low": interval.low, "ci_high": interval.high}
        if "metadata_bits" in group.columns:
            row["metadata_bits"] = int(group["metadata_bits"].iloc[0])
        rows.append(row)
    return pd.DataFrame(rows)


def choose_layouts(results: pd.DataFrame, accuracy: str = "val_accuracy") -> pd.DataFrame:
    """Per target, search setting and reordering: the layout with no more scales than channel-wise whose mean
    ``accuracy`` over seeds is highest (channel-wise's own accuracy beside it)."""
    rows = []
    means = results.groupby(["target", "search", "granularity", "reorder"], as_index=False).agg(
        scales=("scales", "first"), accuracy=(accuracy, "mean"))
    for (target, searched), group in means.groupby(["target", "search"]):
        channel = group[(group["granularity"] == "channel") & (group["reorder"] == "none")]
        if channel.empty:
            continue
        limit = int(channel["scales"].iloc[0])
        for reorder, candidates in group[group["reorder"] != "none"].groupby("reorder"):
            eligible = candidates[candidates["scales"] <= limit]
            if eligible.empty:
                continue
            best = eligible.loc[eligible["accuracy"].idxmax()]
            rows.append({"target": target, "search": bool(searched), "reorder": reorder, "chosen": best["granularity"],
                         "chosen_scales": int(best["scales"]), "chosen_selection_accuracy": 100 * float(best["accuracy"]),
                         "channel_scales": limit, "channel_selection_accuracy": 100 * float(channel["accuracy"].iloc[0])})
    return pd.DataFrame(rows)


def evaluate_chosen(model: nn.Module, data, chosen: pd.DataFrame, calibration_for: Callable[[int], list], seeds: Sequence[int],
                search: ScaleSearchConfig | None = None, device: str = "cpu", split: str = "test",
                exclude: Sequence[str] | None = None, weight_grid: str = "narrow") -> pd.DataFrame:
    """Rebuild each chosen configuration and channel-wise per seed, read ``split`` once for each; per row of
    ``chosen``: both accuracies (means) and chosen - channel-wise paired by seed with a 95% interval."""
    search = search or ScaleSearchConfig()
    cache: dict[tuple, float] = {}

    def accuracy_of(target: str, layout: str, reorder: str, searched: bool, seed: int) -> float:
        key = (target, layout, reorder, searched, seed)
        if key not in cache:
            seeded = ScaleSearchConfig(**{**search.__dict__, "seed": int(seed)})
            quantized, _ = run_configuration(model, parse_target(target), LAYOUTS[layout], reorder, searched,
                                             list(calibration_for(int(seed))), seeded, device, exclude, weight_grid)
            cache[key] = evaluate(quantized, data.eval_loader(split), data.num_classes, device).accuracy
        return cache[key]

    rows = []
    for r in chosen.itertuples():
        channel = [accuracy_of(r.target, "channel", "none", r.search, s) for s in seeds]
        picked = [accuracy_of(r.target, r.chosen, r.reorder, r.search, s) for s in seeds]
        interval = mean_interval([100 * (p - c) for p, c in zip(picked, channel)])
        rows.append({"target": r.target, "search": r.search, "reorder": r.reorder, "chosen": r.chosen,
                     "chosen_scales": r.chosen_scales, f"channel_{split}": 100 * sum(channel) / len(channel),
                     f"chosen_{split}": 100 * sum(picked) / len(picked), "difference": interval.mean, "ci_low": interval.low, "ci_high": interval.high,
                     "seeds": len(seeds)})
    return pd.DataFrame(rows)


def markdown_over_seeds(results: pd.DataFrame, contrasts: pd.DataFrame, tested: pd.DataFrame | None = None,
                        accuracy: str = "val_accuracy") -> str:
    """A study over seeds as Markdown: the mean accuracy table, reordered - plain per layout with its interval
    (one row per target, search and reordering), and the layouts chosen on validation against channel-wise
    on the test split."""
    seeds = sorted(set(results["seed"])) if "seed" in results.columns else []
    lines = [f"Mean over calibration seeds {seeds}:", "", markdown_report(mean_over_seeds(results), accuracy), ""]
    if not contrasts.empty:
        layouts = list(dict.fromkeys(contrasts.sort_values("scales", kind="stable")["granularity"]))
        scales = contrasts.drop_duplicates("granularity").set_index("granularity")["scales"]
        lines += ["Reordered - plain at the same layout (points), mean over seeds [95% interval]:", "",
                  "| target | search | reordering | " + " | ".join(f"{g} ({scales[g]})" for g in layouts) + " |",
                  "|" + "---|" * (len(layouts) + 3)]
        for (target, searched, reorder), group in contrasts.groupby(["target", "search", "reorder"], sort=False):
            by_layout = group.set_index("granularity")
            cells = [f"{by_layout.loc[g, 'difference']:+.2f} [{by_layout.loc[g, 'ci_low']:+.2f}, {by_layout.loc[g, 'ci_high']:+.2f}]"
                     if g in by_layout.index else "" for g in layouts]
            lines.append(f"| {target} | {'yes' if searched else 'no'} | {reorder} | " + " | ".join(cells) + " |")
        lines.append("")
    if tested is not None and not tested.empty:
        split = next(c[len("channel_"):] for c in tested.columns if c.startswith("channel_") and c != "channel_scales")
        lines += [f"Chosen on validation (no more scales than channel-wise), {split} split read once:", "",
                  f"| target | search | reordering | chosen (scales) | channel-wise {split} (%) | chosen {split} (%) | difference [95% interval] |",
                  "|---|---|---|---|---|---|---|"]
        for r in tested.itertuples():
            lines.append(f"| {r.target} | {'yes' if r.search else 'no'} | {r.reorder} | {r.chosen} ({r.chosen_scales}) | "
                         f"{getattr(r, f'channel_{split}'):.2f} | {getattr(r, f'chosen_{split}'):.2f} | "
                         f"{r.difference:+.2f} [{r.ci_low:+.2f}, {r.ci_high:+.2f}] |")
    return "\n".join(lines).rstrip() + "\n"
