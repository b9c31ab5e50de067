"""``python -m cpq_lib.ptq``: PTQ-SL's granularity study of a profile's baseline, written to a resumable CSV.

Example (the committed CIFAR-10 table)::

    python -m cpq_lib.ptq --profile cifar10 --data-root ../shared/data/cifar10-jpeg.zip \\
        --targets W4A8 W4A4 W3A8 W3A4 --splits val test --out results/cifar10/ptqsl.csv

Next to the CSV, ``<out>.json`` records the configuration, the search settings and the environment.
``--report CSV`` prints the Markdown report (accuracy table, Spearman's rho, reordering verdict) of a
finished study without running anything.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import pandas as pd

from ..config import PROFILES, make_config
from ..fileio import atomic_write_json
from ..pipeline import baseline_model, load_data
from ..provenance import run_record
from ..runtime import configure_for
from .reorder import REORDER_METHODS
from .search import METRICS, ScaleSearchConfig
from .study import DEFAULT_GRANULARITIES, SPLITS, markdown_report, ptqsl_study


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.ptq", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--data-root", default=None, help="zip, image-folder root or torchvision root")
    parser.add_argument("--out", help="results CSV (resumed if it exists)")
    parser.add_argument("--report", metavar="CSV", help="print the Markdown report of a results CSV and exit")
    parser.add_argument("--targets", nargs="+", default=["W4A8", "W4A4", "W3A8", "W3A4"])
    parser.add_argument("--granularities", nargs="+", default=list(DEFAULT_GRANULARITIES), choices=list(DEFAULT_GRANULARITIES))
    parser.add_argument("--reorders", nargs="+", default=["none", "sort"], choices=["none", *REORDER_METHODS])
    parser.add_argument("--splits", nargs="+", default=["val"], choices=SPLITS)
    parser.add_argument("--metric", choices=METRICS, default="cosine")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--positions", type=int, default=2048)
    parser.add_argument("--calibration-images", type=int, default=512)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--run-dir", default=None, help="where a profile without a shipped model caches its baseline (default runs/<profile>)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="profile override, e.g. model.name=resnet32")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.report:
        if not Path(args.report).is_file():
            print(f"error: --report {args.report}: no such file", file=sys.stderr)
            return 2
        table = pd.read_csv(args.report)
        print(markdown_report(table, next(f"{s}_accuracy" for s in (*args.splits, *SPLITS) if f"{s}_accuracy" in table)))
        return 0
    if not args.out:
        print("error: --out CSV is required (or --report CSV)", file=sys.stderr)
        return 2
    overrides = {"seed": args.seed, "device": args.device}
    if args.data_root:
        overrides["data.root"] = args.data_root
    if args.threads is not None:
        overrides["threads"] = args.threads
    for item in args.set:
        key, sep, value = item.partition("=")
        if not sep:
            print(f"error: --set expects KEY=VALUE, got {item!r}", file=sys.stderr)
            return 2
        overrides[key] = json.loads(value) if value[:1] in "[{0123456789-tfn" and value not in ("nan",) else value
    try:
        search = ScaleSearchConfig(metric=args.metric, rounds=args.rounds, positions=args.positions, seed=args.seed)
        config = make_config(args.profile, overrides)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.is_dir():
        print(f"error: --out {out} is a folder; give a CSV file path", file=sys.stderr)
        return 2
    out.parent.mkdir(parents=True, exist_ok=True)
    runtime = configure_for(config)
    data = load_data(config)
    run_dir = Path(args.run_dir or Path("runs") / args.profile)
    model, _ = baseline_model(config, data, run_dir, progress=True)
    calibration = data.calibration_loader(args.calibration_images, seed=args.seed)
    settings = {"targets": args.targets, "granularities": {k: DEFAULT_GRANULARITIES[k] for k in args.granularities},
                "reorders": args.reorders, "splits": args.splits, "calibration_images": args.calibration_images,
                "search": search.__dict__, "runtime": runtime, "command": " ".join(["python -m cpq_lib.ptq", *(argv or sys.argv[1:])])}
    atomic_write_json(json.loads(json.dumps(run_record(config, settings), default=str)), out.with_suffix(".json"))
    results = ptqsl_study(model, data, args.targets, calibration, settings["granularities"], args.reorders, (False, True),
                          search, args.splits, config.resolved_device(), out=out, progress=True)
    print(markdown_report(results, f"{args.splits[0]}_accuracy"))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
