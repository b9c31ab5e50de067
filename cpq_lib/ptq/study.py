"""PTQ-SL's granularity study: accuracy vs number of scales, with and without reordering and scale search.

Every configuration starts from the same float model: quantize a copy at one granularity, optionally
reorder channels by range (:mod:`.reorder`: ``permute``, the deployable physical permutation, or the
per-layer index-map variants ``index_sort`` / ``index_kmeans``), calibrate activation scales on training images,
optionally search the scales (:mod:`.search`), then measure. The number of weight scales of the whole
model is the granularity axis; :func:`granularity_correlation` gives Spearman's rank correlation of
accuracy with it, and :func:`reordering_verdict` answers the paper's claim (does reordered
sub-layerwise quantization beat channel-wise at an equal or smaller number of scales?). Each row
also carries the layout's metadata: fp32 scales plus the 16-bit group index of every row and column
of the layers whose blocks are not contiguous (the index-map variants pay them; a permuted network
does not, its permutation is folded into the stored weights).
"""

from __future__ import annotations

import copy
import hashlib
import time
from pathlib import Path
from dataclasses import asdict
from typing import Iterable, Sequence

import pandas as pd
from scipy.stats import spearmanr
from torch import nn

import torch

from ..artefacts import ArtefactKey, check_same_key, read_key_file, state_fingerprint, write_key_file
from ..fileio import atomic_write_text
from ..progress import progress as progress_bar
from ..quant.metrics import GROUP_INDEX_BITS, SCALE_BITS
from ..quant.quantizers import check_bits, contiguous_groups
from ..quant.transform import QuantConfig, calibrate_, quantize_, quantized_layers
from ..train import evaluate
from .reorder import INDEX_METHODS, REORDER_METHODS, permute_reorder_, reorder_channels_
from .search import ScaleSearchConfig, search_scales_

# label -> (granularity, blocks): layer-wise, sub-layerwise n_V x n_H, channel-wise and beyond it
DEFAULT_GRANULARITIES: dict[str, tuple[str, tuple[int, int] | None]] = {
    "layer": ("tensor", None), "2x1": ("block", (2, 1)), "2x2": ("block", (2, 2)), "4x1": ("block", (4, 1)),
    "8x1": ("block", (8, 1)), "4x4": ("block", (4, 4)), "8x2": ("block", (8, 2)), "16x1": ("block", (16, 1)),
    "16x2": ("block", (16, 2)), "channel": ("channel", None), "16x4": ("block", (16, 4)),
}
# layouts with channel-wise's number of scales in every layer: C_out / k row groups x k column groups
EQUAL_SCALE_LAYOUTS: dict[str, tuple[str, tuple[int, int] | None]] = {"C/2x2": ("split", (0, 2)), "C/4x4": ("split", (0, 4))}
LAYOUTS = {**DEFAULT_GRANULARITIES, **EQUAL_SCALE_LAYOUTS}
SPLITS = ("train", "val", "test")


def parse_target(target: str) -> tuple[int, int | None]:
    """'W4A8' -> (4, 8); 'W4' or 'W4Afp' -> (4, None)."""
    expected = f"target {target!r}: expected W<bits>A<bits> (e.g. W4A8) or W<bits> for float activations"
    text = target.strip().upper()
    if not text.startswith("W"):
        raise ValueError(expected)
    weight, _, act = text[1:].partition("A")
    try:
        bits = int(weight), (None if act in ("", "FP") else int(act))
    except ValueError:
        raise ValueError(expected) from None
    for value, name in zip(bits, ("weight", "activation")):
        if value is not None:
            try:
                check_bits(value, f"{name} bits")
            except ValueError as exc:
                raise ValueError(f"target {target!r}: {exc}") from None
    return bits


STUDY_CODE = ("ptq", "quant", "train/evaluate", "data")  # the code a row's numbers depend on


def calibration_digest(calibration: Sequence) -> str:
    """Hash of the calibration batches (images and labels) a study calibrates and searches on."""
    digest = hashlib.sha256()
    for images, labels in calibration:
        for tensor in (images, labels):
            digest.update(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]


def layout_metadata(model: nn.Module) -> dict[str, int]:
    """Scales and group-index maps of every quantized layer, in bits: what a runtime stores beside the codes.

    A layer's maps count only when its groups are not contiguous (contiguous blocks need two numbers per
    layer, n_V and n_H, which we do not count)."""
    scales = maps = 0
    for _, layer in quantized_layers(model):
        q = layer.weight_quantizer
        scales += SCALE_BITS * q.scale.numel()
        if not q.contiguous_blocks:
            maps += GROUP_INDEX_BITS * (q.row_groups.numel() + q.col_groups.numel())
    return {"scale_bits": scales, "map_bits": maps, "metadata_bits": scales + maps}


def study_key(model: nn.Module, data, calibration: Sequence, search: ScaleSearchConfig,
              exclude: Sequence[str] | None = None, weight_grid: str = "narrow") -> ArtefactKey:
    """What a row of the study depends on beyond its own (target, granularity, reorder, search) labels:
    the float model, the data, the calibration images, the search settings, the precision and the code.
    Targets, granularities and splits are not in it: a study may be extended by rows of new ones."""
    return ArtefactKey.make("ptq-study", {
        "model": state_fingerprint(model), "dataset": data.name, "val_digest": data.val_digest,
        "calibration": calibration_digest(calibration), "search": search,
        "exclude": None if exclude is None else list(exclude), "dtype": torch.get_default_dtype(),
        **({} if weight_grid == "narrow" else {"weight_grid": weight_grid})}, STUDY_CODE)


def check_resumable(out: str | Path, key: ArtefactKey) -> None:
    """A study CSV at ``out`` may be extended only by a run of the same settings; the error lists the differences."""
    out = Path(out)
    if out.is_dir():
        raise ValueError(f"{out} is a folder; give a CSV file path")
    if out.exists():
        check_same_key(read_key_file(out), key, out, f"choose another --out, or remove {out} (and {out.name}.key.json) to start over")


def _variants(granularity: str, reorders: Sequence[str], searches: Sequence[bool]) -> list[tuple[str, bool]]:
    """Reordering only changes block layouts: layer-wise and channel-wise get 'none' alone."""
    usable = [r for r in reorders if granularity in ("block", "split") or r == "none"] or ["none"]
    return [(r, s) for r in dict.fromkeys(usable) for s in searches]


def ptqsl_study(model: nn.Module, data, targets: Sequence[str], calibration: Iterable,
                granularities: dict[str, tuple[str, tuple[int, int] | None]] | None = None,
                reorders: Sequence[str] = ("none", "permute"), searches: Sequence[bool] = (False, True),
                search: ScaleSearchConfig | None = None, splits: Sequence[str] = ("val",), device: str = "cpu",
                exclude: Sequence[str] | None = None, out: str | Path | None = None, progress: bool = True,
                weight_grid: str = "narrow") -> pd.DataFrame:
    """One row per (target, granularity, reordering, search): scales, accuracy per split, search cost.

    ``calibration`` (training images with labels) calibrates and drives the search (and its first
    batch gives the reordering's graph analysis an example input); ``weight_grid`` is the weight
    grid (``"full"``: the authors' ``[-2^(b-1), 2^(b-1) - 1]`` and start); ``splits`` are
    where accuracy is measured (the test split belongs in a final report only). With ``out``, the
    CSV is rewritten (atomically) after every configuration and rows already in it are not run again,
    so a killed study resumes where it stopped; ``<out>.key.json`` holds :func:`study_key`, and a CSV made
    with other settings is refused (:class:`cpq_lib.artefacts.ArtefactMismatchError`), never mixed.
    """
    granularities = granularities or DEFAULT_GRANULARITIES
    search = search or ScaleSearchConfig()
    bad = [r for r in reorders if r != "none" and r not in REORDER_METHODS]
    if bad:
        raise ValueError(f"reorders: {bad} not allowed; choose from {['none', *REORDER_METHODS]}")
    bad_splits = [s for s in splits if s not in SPLITS]
    if bad_splits or not splits:
        raise ValueError(f"splits: {list(splits)} not allowed; choose one or more of {list(SPLITS)}")
    parsed = {t: parse_target(t) for t in targets}
    calibration = list(calibration)
    if not calibration:
        raise ValueError("PTQ-SL study: calibration data is empty")
    key = study_key(model, data, calibration, search, exclude, weight_grid)
    if out is not None:
        check_resumable(out, key)
        write_key_file(out, key)
    jobs = [(t, label, reorder, searched) for t in targets for label, (granularity, _) in granularities.items()
            for reorder, searched in _variants(granularity, reorders, searches)]
    all_jobs = list(jobs)
    done = _finished_rows(out, splits)
    rows = [row for row in done.values()]
    jobs = [job for job in jobs if _key(*job) not in done]
    for target, label, reorder, searched in progress_bar(jobs, progress, desc="PTQ-SL study"):
        quantized, row = run_configuration(model, parsed[target], granularities[label], reorder, searched, calibration,
                                           search, device, exclude, weight_grid)
        row = {"target": target, "granularity": label, **row}
        for split in splits:
            row[f"{split}_accuracy"] = evaluate(quantized, data.eval_loader(split), data.num_classes, device).accuracy
        rows.append(row)
        if out is not None:
            atomic_write_text(pd.DataFrame(rows).to_csv(index=False), out)
    order = {_key(*job): i for i, job in enumerate(all_jobs)}
    rows.sort(key=lambda r: order.get(_key(r["target"], r["granularity"], r["reorder"], bool(r["search"])), len(order)))
    result = pd.DataFrame(rows)
    result.attrs["search"] = asdict(search)
    return result


LEGACY_REORDER_NAMES = {"sort": "index_sort", "kmeans": "index_kmeans"}  # studies written before ``permute`` existed


def read_study_csv(path: str | Path) -> pd.DataFrame:
    """A study CSV, with the reordering names of older studies (index maps called ``sort`` / ``kmeans``) renamed."""
    table = pd.read_csv(path)
    if "reorder" in table.columns:
        table["reorder"] = table["reorder"].replace(LEGACY_REORDER_NAMES)
    return table


def _split_layout_(model: nn.Module, columns_per_row: int) -> None:
    """Every quantized layer regrouped into C_out / k x k contiguous blocks (channel-wise's scale count per layer)."""
    for _, layer in quantized_layers(model):
        quantizer = layer.weight_quantizer
        rows, cols = quantizer.row_groups.numel(), quantizer.col_groups.numel()
        k = min(columns_per_row, cols, rows)
        quantizer.set_groups(contiguous_groups(rows, max(1, rows // k)), contiguous_groups(cols, k), weight=layer.weight)


def run_configuration(model: nn.Module, bits: tuple[int, int | None], layout: tuple[str, tuple[int, int] | None], reorder: str,
                      searched: bool, calibration: list, search: ScaleSearchConfig, device: str = "cpu",
                      exclude: Sequence[str] | None = None, weight_grid: str = "narrow") -> tuple[nn.Module, dict]:
    """One configuration of the study: a quantized copy of ``model`` and its row (layout, metadata, search cost).

    Deterministic for its inputs, so a configuration chosen on validation can be rebuilt to read the test split once.
    """
    weight_bits, act_bits = bits
    granularity, blocks = layout
    config = QuantConfig(weight_bits=weight_bits, act_bits=act_bits, granularity="channel" if granularity == "split" else granularity,
                         blocks=None if granularity == "split" else blocks, weight_grid=weight_grid,
                         **({} if exclude is None else {"exclude": tuple(exclude)}))
    quantized = quantize_(copy.deepcopy(model), config).eval()
    if granularity == "split":
        _split_layout_(quantized, blocks[1])
    reference = model  # what the search compares layer outputs with: permuted alike when the network is
    if reorder == "permute":
        reference = copy.deepcopy(model)
        permute_reorder_(quantized, calibration[0][0][:2].to(device), followers=[reference])
    elif reorder in INDEX_METHODS:
        reorder_channels_(quantized, reorder, seed=search.seed)
    calibrate_(quantized, calibration, device)
    started = time.perf_counter()
    table = search_scales_(quantized, reference, calibration, search, device, progress=False) if searched else None
    seconds = time.perf_counter() - started if searched else 0.0
    row = {"weight_bits": weight_bits, "act_bits": act_bits, "reorder": reorder, "search": bool(searched),
           "scales": sum(layer.weight_quantizer.scale.numel() for _, layer in quantized_layers(quantized)),
           **layout_metadata(quantized), "search_seconds": round(seconds, 2),
           "metric_start": float(table["metric_start"].sum()) if table is not None else float("nan"),
           "metric_end": float(table["metric_end"].sum()) if table is not None else float("nan")}
    return quantized, row


def _key(target: str, granularity: str, reorder: str, searched: bool) -> tuple:
    return (target, granularity, reorder, bool(searched))


def _finished_rows(out: str | Path | None, splits: Sequence[str]) -> dict[tuple, dict]:
    """Rows of an earlier, interrupted run of the same study (those measured on every wanted split)."""
    if out is None or not Path(out).exists():
        return {}
    table = pd.read_csv(out)
    missing = [f"{s}_accuracy" for s in splits if f"{s}_accuracy" not in table.columns]
    if missing:
        raise ValueError(f"{out}: an earlier study without the columns {missing}; choose another --out or remove it")
    table["search"] = table["search"].astype(bool)
    table["act_bits"] = table["act_bits"].astype(object).where(table["act_bits"].notna(), None)
    return {_key(r["target"], r["granularity"], r["reorder"], r["search"]): r for r in table.to_dict("records")}


def granularity_correlation(results: pd.DataFrame, accuracy: str = "val_accuracy") -> pd.DataFrame:
    """Spearman's rho (and p) of accuracy vs number of scales per (target, reorder, search), and per target overall.

    A group whose accuracy is the same at every granularity has no rank correlation: NaN (shown as such),
    not a warning.
    """
    rows = []
    for keys, group in [*results.groupby(["target", "reorder", "search"]), *results.groupby(["target"])]:
        keys = keys if isinstance(keys, tuple) else (keys,)
        if len(keys) == 1:
            keys = (keys[0], "all", "all")
        if group["scales"].nunique() < 3:
            continue
        if group[accuracy].nunique() < 2:
            rho = p = float("nan")
        else:
            rho, p = spearmanr(group["scales"], group[accuracy])
        rows.append({"target": keys[0], "reorder": keys[1], "search": keys[2], "points": len(group),
                     "spearman_rho": float(rho), "p_value": float(p)})
    return pd.DataFrame(rows, columns=["target", "reorder", "search", "points", "spearman_rho", "p_value"])


def reordering_verdict(results: pd.DataFrame, accuracy: str = "val_accuracy", reorder: str = "permute") -> pd.DataFrame:
    """Per (target, search): channel-wise accuracy vs the best reordered sub-layerwise one with no more scales."""
    rows = []
    for (target, searched), group in results.groupby(["target", "search"]):
        channel = group[group["granularity"] == "channel"]
        blocks = group[(group["reorder"] == reorder)]
        if channel.empty or blocks.empty:
            continue
        channel_row = channel.iloc[0]
        eligible = blocks[blocks["scales"] <= channel_row["scales"]]
        if eligible.empty:
            continue
        best = eligible.loc[eligible[accuracy].idxmax()]
        rows.append({"target": target, "search": bool(searched), "channel_scales": int(channel_row["scales"]),
                     "channel_accuracy": float(channel_row[accuracy]), "best_reordered": best["granularity"],
                     "reordered_scales": int(best["scales"]), "reordered_accuracy": float(best[accuracy]),
                     "difference": float(best[accuracy] - channel_row[accuracy]),
                     "beats_channel": bool(best[accuracy] > channel_row[accuracy])})
    return pd.DataFrame(rows, columns=["target", "search", "channel_scales", "channel_accuracy", "best_reordered",
                                       "reordered_scales", "reordered_accuracy", "difference", "beats_channel"])


def accuracy_table(results: pd.DataFrame, accuracy: str = "val_accuracy") -> pd.DataFrame:
    """Accuracy (%) with targets x variants as rows and granularities (by number of scales) as columns."""
    variant = results["reorder"].where(results["reorder"] != "none", "plain") + results["search"].map({True: " + search", False: ""})
    view = results.assign(variant=variant, percent=100 * results[accuracy])
    scales = results.drop_duplicates("granularity").set_index("granularity")["scales"].sort_values(kind="stable")
    table = view.pivot_table(index=["target", "variant"], columns="granularity", values="percent")
    table = table.reindex(columns=list(scales.index)).reindex(list(dict.fromkeys(results["target"])), level=0)
    table.columns = [f"{g} ({scales[g]})" for g in table.columns]
    return table


def markdown_report(results: pd.DataFrame, accuracy: str = "val_accuracy") -> str:
    """The accuracy table, Spearman's rho per target and the reordering verdict, as Markdown."""
    table = accuracy_table(results, accuracy)
    header = "| target | variant | " + " | ".join(table.columns) + " |"
    lines = [header, "|" + "---|" * (len(table.columns) + 2)]
    for (target, variant), row in table.iterrows():
        cells = ["" if pd.isna(v) else f"{v:.2f}" for v in row]
        lines.append(f"| {target} | {variant} | " + " | ".join(cells) + " |")
    lines.append("")
    correlation = granularity_correlation(results, accuracy)
    overall = correlation[correlation["reorder"] == "all"]
    lines.append("Spearman's rho of accuracy vs number of scales (all configurations of a target): " + (", ".join(
        f"{r.target} {r.spearman_rho:+.2f} (p {r.p_value:.3f})" for r in overall.itertuples()) or "needs 3 or more granularities") + ".")
    lines.append("")
    lines.append("| target | reordering | search | channel-wise (scales) | best reordered with no more scales | difference (points) |")
    lines.append("|---|---|---|---|---|---|")
    for reorder in [r for r in dict.fromkeys(results["reorder"]) if r != "none"]:
        for r in reordering_verdict(results, accuracy, reorder).itertuples():
            lines.append(f"| {r.target} | {reorder} | {'yes' if r.search else 'no'} | {100 * r.channel_accuracy:.2f} ({r.channel_scales}) | "
                         f"{r.best_reordered}: {100 * r.reordered_accuracy:.2f} ({r.reordered_scales}) | {100 * r.difference:+.2f} |")
    return "\n".join(lines)
