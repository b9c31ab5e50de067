"""``python -m cpq_lib.ptq``: PTQ-SL's granularity study of a profile's baseline, written to a resumable CSV.

Example (the committed CIFAR-10 study over three calibration seeds, with the test reading)::

    python -m cpq_lib.ptq --profile cifar10 --data-root ../shared/data/cifar10-jpeg.zip \\
        --targets W4A4 W3A4 --granularities layer 4x1 8x1 8x2 16x2 C/2x2 C/4x4 channel \\
        --reorders none permute index_sort --seeds 0 1 2 --test-chosen --out results/cifar10/ptqsl-seeds.csv

Next to the CSV, ``<out>.json`` records the configuration, the search settings and the environment.
``--report CSV`` prints the Markdown report (accuracy table, Spearman's rho, reordering verdict; for a
study over seeds also the paired contrasts and the test reading) of a finished study without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ..artefacts import ArtefactMismatchError
from ..cli import check_output_file, fail, integer_at_least, parse_overrides
from ..config import PROFILES, make_config
from ..fileio import atomic_write_json, atomic_write_text
from ..pipeline import baseline_model, load_data
from ..provenance import run_record
from ..runtime import configure_for
from .reorder import REORDER_METHODS
from .search import METRICS, ScaleSearchConfig
from .contrasts import choose_layouts, evaluate_chosen, markdown_over_seeds, reordering_contrasts, study_over_seeds
from .study import (
    DEFAULT_GRANULARITIES, LAYOUTS, SPLITS, check_resumable, markdown_report, parse_target, ptqsl_study, read_study_csv, study_key,
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.ptq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--data-root", default=None, help="zip, image-folder root or torchvision root")
    parser.add_argument("--out", help="results CSV (resumed if it exists and was made with the same settings)")
    parser.add_argument("--report", metavar="CSV", help="print the Markdown report of a results CSV and exit")
    parser.add_argument("--targets", nargs="+", default=["W4A8", "W4A4", "W3A8", "W3A4"])
    parser.add_argument("--granularities", nargs="+", default=list(DEFAULT_GRANULARITIES), choices=list(LAYOUTS),
                        help="layouts; C/2x2 and C/4x4 give every layer channel-wise's number of scales")
    parser.add_argument("--reorders", nargs="+", default=["none", "permute"], choices=["none", *REORDER_METHODS],
                        help="permute: one physical permutation per channel space (deployable); index_sort / index_kmeans: "
                             "per-layer index maps (counted in metadata_bits)")
    parser.add_argument("--weight-grid", choices=["narrow", "full"], default="narrow",
                        help="full: the authors' [-2^(b-1), 2^(b-1)-1] grid and their start max|w| / (2^(b-1) - 0.5)")
    parser.add_argument("--splits", nargs="+", default=["val"], choices=SPLITS)
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument("--rounds", type=integer_at_least(1), default=2)
    parser.add_argument("--positions", type=integer_at_least(1), default=2048)
    parser.add_argument("--calibration-images", type=integer_at_least(1), default=512)
    parser.add_argument("--seed", type=integer_at_least(0), default=0)
    parser.add_argument("--seeds", type=integer_at_least(0), nargs="+", default=None,
                        help="calibration seeds: one study per seed (<out stem>-s<seed>.csv), then paired contrasts with "
                             "95%% intervals (<stem>-contrasts.csv) and the layouts chosen on the first split (<stem>-chosen.csv)")
    parser.add_argument("--test-chosen", action="store_true",
                        help="with --seeds: rebuild the chosen layouts and channel-wise and read the test split once (<stem>-test.csv)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=integer_at_least(1), default=None)
    parser.add_argument("--run-dir", default=None, help="where a profile without a shipped model caches its baseline (default runs/<profile>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="profile override, e.g. model.name=resnet32")
    return parser


def report(path: str, splits: list[str]) -> int:
    """Print the report of a finished study CSV, or one line saying why it cannot be read."""
    csv = Path(path)
    if csv.is_dir():
        return fail(f"--report {csv} is a folder; give a study CSV")
    if not csv.is_file():
        return fail(f"--report {csv}: no such file")
    try:
        table = read_study_csv(csv)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError) as exc:
        return fail(f"--report {csv} is not a study CSV ({exc})")
    missing = [c for c in REPORT_COLUMNS if c not in table.columns]
    accuracy = next((f"{s}_accuracy" for s in (*splits, *SPLITS) if f"{s}_accuracy" in table.columns), None)
    if missing or accuracy is None or table.empty:
        why = (f"it lacks the columns {missing}" if missing else
               "it has no accuracy column (train_accuracy, val_accuracy or test_accuracy)" if accuracy is None else "it has no rows")
        return fail(f"--report {csv} is not a study CSV written by python -m cpq_lib.ptq: {why}")
    if "seed" in table.columns:  # a study over seeds: its contrasts and test reading sit beside it
        stem = str(csv.with_suffix(""))
        contrasts = Path(f"{stem}-contrasts.csv")
        tested = Path(f"{stem}-test.csv")
        print(markdown_over_seeds(table, pd.read_csv(contrasts) if contrasts.is_file() else reordering_contrasts(table, accuracy),
                                  pd.read_csv(tested) if tested.is_file() else None, accuracy), end="")
        return 0
    print(markdown_report(table, accuracy))
    return 0


REPORT_COLUMNS = ("target", "granularity", "reorder", "search", "scales")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        return report(args.report, args.splits)
    if not args.out:
        return fail("--out CSV is required (or --report CSV)")
    if args.test_chosen and not args.seeds:
        return fail("--test-chosen needs --seeds (the layouts are chosen over seeds on the first split)")
    if args.seeds and "test" in args.splits:
        return fail("with --seeds leave test out of --splits: --test-chosen reads it once, for the chosen layouts only")
    try:  # everything is checked before data or models are loaded
        for target in args.targets:
            parse_target(target)
        overrides = {"seed": args.seed, "device": args.device, **parse_overrides(args.set)}
        if args.data_root:
            overrides["data.root"] = args.data_root
        if args.threads is not None:
            overrides["threads"] = args.threads
        search = ScaleSearchConfig(metric=args.metric, rounds=args.rounds, positions=args.positions, seed=args.seed)
        config = make_config(args.profile, overrides)
        device = config.resolved_device()
        out = check_output_file(args.out)
    except ValueError as exc:
        return fail(str(exc))
    runtime = configure_for(config)
    data = load_data(config)
    run_dir = Path(args.run_dir or Path("runs") / args.profile)
    model, _ = baseline_model(config, data, run_dir, progress=True)
    try:  # a CSV made with other settings is refused before its record is touched (per seed: each seed's own CSV)
        for seed, path in ([(s, Path(f"{out.with_suffix('')}-s{s}.csv")) for s in args.seeds] if args.seeds else [(args.seed, out)]):
            seeded = ScaleSearchConfig(**{**search.__dict__, "seed": seed})
            calibration = list(data.calibration_loader(args.calibration_images, seed=seed))
            check_resumable(path, study_key(model, data, calibration, seeded, weight_grid=args.weight_grid))
    except ArtefactMismatchError as exc:
        return fail(str(exc))
    settings = {"targets": args.targets, "granularities": {k: LAYOUTS[k] for k in args.granularities}, "seeds": args.seeds,
                "reorders": args.reorders, "weight_grid": args.weight_grid, "splits": args.splits, "calibration_images": args.calibration_images,
                "search": search.__dict__, "runtime": runtime, "command": " ".join(["python -m cpq_lib.ptq", *(argv or sys.argv[1:])])}
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(json.loads(json.dumps(run_record(config, settings), default=str)), out.with_suffix(".json"))
    if args.seeds:
        return _over_seeds(args, model, data, settings, search, device, out)
    results = ptqsl_study(model, data, args.targets, calibration, settings["granularities"], args.reorders, (False, True),
                          search, args.splits, device, out=out, progress=True, weight_grid=args.weight_grid)
    print(markdown_report(results, f"{args.splits[0]}_accuracy"))
    return 0


def _over_seeds(args, model, data, settings: dict, search: ScaleSearchConfig, device: str, out: Path) -> int:
    """One study per calibration seed, the paired contrasts, the layouts chosen on the first split, test once."""
    stem = str(out.with_suffix(""))

    def calibration_for(seed: int) -> list:
        return list(data.calibration_loader(args.calibration_images, seed=seed))

    results = study_over_seeds(model, data, args.targets, calibration_for, args.seeds, stem, search,
                               granularities=settings["granularities"], reorders=args.reorders, splits=args.splits,
                               device=device, progress=True, weight_grid=args.weight_grid)
    selection = f"{args.splits[0]}_accuracy"
    contrasts, chosen = reordering_contrasts(results, selection), choose_layouts(results, selection)
    atomic_write_text(results.to_csv(index=False), out)
    atomic_write_text(contrasts.to_csv(index=False), Path(f"{stem}-contrasts.csv"))
    atomic_write_text(chosen.to_csv(index=False), Path(f"{stem}-chosen.csv"))
    print(contrasts.round(2).to_string(index=False))
    print(chosen.round(2).to_string(index=False))
    if args.test_chosen:
        tested = evaluate_chosen(model, data, chosen, calibration_for, args.seeds, search, device, "test",
                                 weight_grid=args.weight_grid)
        atomic_write_text(tested.to_csv(index=False), Path(f"{stem}-test.csv"))
        print(tested.round(2).to_string(index=False))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
