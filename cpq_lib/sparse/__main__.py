"""``python -m cpq_lib.sparse``: the focused-quantization pipeline and its baseline on a profile's model.

Example (the committed CIFAR-10 results)::

    python -m cpq_lib.sparse --profile cifar10 --data-root ../shared/data/cifar10-jpeg.zip \\
        --out results/cifar10/focused --prune-epochs 2 --quant-epochs 1

Stage checkpoints go to ``--run-dir`` (default ``runs/<profile>/focused``): a killed run resumes there.
The tables (stages, layers, sizes) and ``summary.json`` (configuration, test accuracies, command,
environment) go to ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from pathlib import Path

from ..config import PROFILES, make_config
from ..pipeline import baseline_model, load_data
from ..provenance import run_record
from ..runtime import configure_for
from .pipeline import CompressionConfig, compress_model, save_results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.sparse", description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile", choices=PROFILES, default="quick")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True, help="folder for the result tables")
    parser.add_argument("--run-dir", default=None)
    parser.add_argument("--sparsity", type=float, default=0.8)
    parser.add_argument("--scope", default="layer")
    parser.add_argument("--prune-steps", type=int, default=3)
    parser.add_argument("--prune-epochs", type=int, default=1)
    parser.add_argument("--bits", type=int, default=5)
    parser.add_argument("--baseline-bits", type=int, default=5)
    parser.add_argument("--fractions", type=float, nargs="+", default=[0.25, 0.5, 0.75, 0.875, 1.0])
    parser.add_argument("--quant-epochs", type=int, default=1)
    parser.add_argument("--lr", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    overrides = {"seed": args.seed, "device": args.device, **({"data.root": args.data_root} if args.data_root else {}),
                 **({"threads": args.threads} if args.threads is not None else {})}
    try:
        config = make_config(args.profile, overrides)
        compression = CompressionConfig(sparsity=args.sparsity, scope=args.scope, prune_steps=args.prune_steps,
                                        prune_epochs=args.prune_epochs, bits=args.bits, baseline_bits=args.baseline_bits,
                                        fractions=tuple(args.fractions), quant_epochs=args.quant_epochs, seed=args.seed)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    out = Path(args.out)
    if out.is_file():
        print(f"error: --out {out} is a file; give a folder", file=sys.stderr)
        return 2
    runtime = configure_for(config)
    data = load_data(config)
    run_dir = Path(args.run_dir or Path("runs") / args.profile / "focused")
    model, _ = baseline_model(config, data, Path("runs") / args.profile if args.run_dir is None else run_dir.parent, progress=True)
    train = dataclasses.replace(config.refine, lr=args.lr, schedule="cosine")
    result = compress_model(model, data, compression, train, run_dir, config.resolved_device(), progress=True)
    record = run_record(config, {"runtime": runtime, "command": " ".join(["python -m cpq_lib.sparse", *(argv if argv is not None else sys.argv[1:])])})
    save_results(result, out, {"record": json.loads(json.dumps(record, default=str))})
    sizes = result["sizes"]
    print(result["stages"].to_string(index=False))
    print(sizes[sizes["layer"] == "total"][["method", "coder", "bits", "ratio"]].to_string(index=False))
    print("test accuracy:", result["test_accuracy"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
