"""``python -m cpq_lib.sparse``: the focused-quantization pipeline and its baseline on a profile's model.

Example (the committed CIFAR-10 results)::

    python -m cpq_lib.sparse --profile cifar10 --data-root ../shared/data/cifar10-jpeg.zip \\
        --out results/cifar10/focused --prune-epochs 2 --quant-epochs 1

Stage checkpoints go to ``--run-dir`` (default ``runs/<profile>/focused``): a killed run resumes there,
and a run with other settings recomputes the stages its settings change (each stage file carries the
key of what made it).
The tables (stages, layers, sizes) and ``summary.json`` (configuration, test accuracies, command,
environment) go to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..cli import check_output_folder, fail, integer_at_least, integer_between, parse_overrides, positive_float
from ..config import PROFILES, make_config
from ..fileio import atomic_write_text
from ..pipeline import baseline_model, load_data
from ..provenance import run_record
from ..runtime import configure_for
from .focused import ASSIGNMENTS, LEVEL_SETS, MAX_BITS, MIN_BITS
from .pipeline import PRUNING_METHODS, CompressionConfig, compress_model, load_results, save_results
from .pruning import SCOPES
from .seeds import accuracy_over_seeds, contrasts_over_seeds, ratios_over_seeds, stages_over_seeds


def _sparsity(default: float, pairs: list[str]):
    """--sparsity alone, or the --layer-sparsity PATTERN=VALUE pairs then ('*', --sparsity)."""
    if not pairs:
        return default
    parsed = []
    for text in pairs:
        pattern, sep, value = text.rpartition("=")
        try:
            parsed.append((pattern, float(value)))
        except ValueError:
            sep = ""
        if not sep or not pattern:
            raise ValueError(f"--layer-sparsity {text!r}: expected PATTERN=VALUE, e.g. 'layer3.*=0.9'")
    return (*parsed, ("*", default))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.sparse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True, help="folder for the result tables")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--layer-sparsity", action="append", default=[], metavar="PATTERN=VALUE",
                        help="a layer's own target (fnmatch pattern on its name; the first match wins, --sparsity for the "
                             "rest), e.g. 'layer3.*=0.9'; repeatable")
    parser.add_argument("--scope", default="layer", choices=SCOPES, help="layer: each layer its own target; global: one "
                        "magnitude threshold over all layers (their sparsities then differ)")
    parser.add_argument("--pruning", default="magnitude", choices=PRUNING_METHODS,
                        help="surgery: dynamic network surgery (masks follow training, cut weights can grow back)")
    parser.add_argument("--prune-steps", type=integer_at_least(1), default=3)
    parser.add_argument("--prune-epochs", type=integer_at_least(0), default=1)
    parser.add_argument("--bits", type=integer_between(MIN_BITS, MAX_BITS), default=5)
    parser.add_argument("--levels", choices=LEVEL_SETS, default="paper",
                        help="paper: 2^(bits-3) exponents plus zero per component, nearest rounding; log2: the older set "
                             "(no zero, 2^(bits-2) exponents, log-domain rounding; about the paper's bits + 1)")
    parser.add_argument("--assignment", choices=ASSIGNMENTS, default="argmax", help="component per weight: most likely, or sampled")
    parser.add_argument("--hardware", action="store_true", help="power-of-two centres and tied spreads (multiplication-free)")
    parser.add_argument("--no-refit", dest="refit", action="store_false",
                        help="fit mixtures once (default: re-estimate before every incremental step)")
    parser.add_argument("--baseline-bits", type=integer_between(1, 8), default=5)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.875, 1.0])
    parser.add_argument("--quant-epochs", type=integer_at_least(1), default=1)
    parser.add_argument("--final-epochs", type=integer_at_least(1), default=None,
                        help="epochs of the last incremental step, ending at its best validation epoch (the baselines get "
                             "the same total and the same choice)")
    parser.add_argument("--lr", type=positive_float, default=0.01)
    parser.add_argument("--seed", type=integer_at_least(0), default=0)
    parser.add_argument("--seeds", type=integer_at_least(0), nargs="+", default=None,
                        help="one run per seed (<out>/s<seed>, stages in <run-dir>/s<seed>), then each method's test accuracy "
                             "and ratio with 95%% intervals and the paired contrasts (<out>/accuracy.csv, ratios.csv, "
                             "contrasts.csv, stages.csv)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=integer_at_least(1), default=None)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="profile override, e.g. data.image_size=160 or model.name=resnet50 (repeatable)")
    args = parser.parse_args(argv)
    try:  # everything is checked before data or models are loaded
        overrides = {"seed": args.seed, "device": args.device, **({"data.root": args.data_root} if args.data_root else {}),
                     **({"threads": args.threads} if args.threads is not None else {}), **parse_overrides(args.set)}
        config = make_config(args.profile, overrides)
        if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
            raise ValueError(f"--seeds {args.seeds}: each seed once")
        compression = CompressionConfig(sparsity=_sparsity(args.sparsity, args.layer_sparsity), scope=args.scope, pruning=args.pruning, prune_steps=args.prune_steps,
                                        prune_epochs=args.prune_epochs, bits=args.bits, levels=args.levels,
                                        assignment=args.assignment, hardware=args.hardware, refit=args.refit,
                                        baseline_bits=args.baseline_bits,
                                        fractions=tuple(args.fractions), quant_epochs=args.quant_epochs,
                                        final_epochs=args.final_epochs, seed=args.seed)
        train = dataclasses.replace(config.refine, lr=args.lr, schedule="cosine")
        config.resolved_device()
        out = check_output_folder(args.out)
        run_dir = check_output_folder(args.run_dir or Path("runs") / args.profile / "focused", "--run-dir")
    except ValueError as exc:
        return fail(str(exc))
    runtime = configure_for(config)
    data = load_data(config)
    model, _ = baseline_model(config, data, Path("runs") / args.profile if args.run_dir is None else run_dir.parent, progress=True)
    command = " ".join(["python -m cpq_lib.sparse", *(argv if argv is not None else sys.argv[1:])])
    if args.seeds is None:
        _run_one(model, data, config, compression, train, run_dir, out, runtime, command)
        return 0
    results = []
    for seed in args.seeds:  # each seed its own stage folder: a killed study resumes at its last epoch
        seeded = dataclasses.replace(compression, seed=seed)
        _run_one(model, data, dataclasses.replace(config, seed=seed), seeded, train, run_dir / f"s{seed}", out / f"s{seed}",
                 runtime, command)
        results.append(load_results(out / f"s{seed}"))
    tables = {"accuracy": accuracy_over_seeds(results), "ratios": ratios_over_seeds(results),
              "contrasts": contrasts_over_seeds(results), "stages": stages_over_seeds(results)}
    for name, table in tables.items():
        atomic_write_text(table.to_csv(index=False), out / f"{name}.csv")
        print(table.round(2).to_string(index=False))
    return 0


def _run_one(model, data, config, compression: CompressionConfig, train, run_dir: Path, out: Path, runtime: dict,
             command: str) -> None:
    """One seed's pipeline, its tables and summary (configuration, environment, command) saved to ``out``."""
    result = compress_model(model, data, compression, train, run_dir, config.resolved_device(), progress=True)
    record = run_record(config, {"runtime": runtime, "command": command})
    save_results(result, out, {"record": json.loads(json.dumps(record, default=str))})
    sizes = result["sizes"]
    print(result["stages"].to_string(index=False))
    print(sizes[sizes["layer"] == "total"][["method", "coder", "bits", "ratio"]].to_string(index=False))
    print("test accuracy:", result["test_accuracy"])


if __name__ == "__main__":
    raise SystemExit(main())
