"""Train a full-precision baseline: ``python -m cpq_lib.train --profile cifar10 --data-root <zip> --out <dir>``.

Killed runs resume from ``<out>/state.pt`` when started again with the same arguments.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path

from ..config import make_config
from ..errors import CpqError
from ..pipeline import load_data, train_baseline
from ..runtime import configure_for


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.train", description=__doc__)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True, help="folder for state.pt, log.jsonl, model.pt and model.json")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, e.g. train.epochs=80 (repeatable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; give a folder (created if missing)")
    overrides = {"data.root": args.data_root} if args.data_root else {}
    for item in args.set:
        if "=" not in item:
            parser.error(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        overrides[key] = parse_value(value)
    try:
        config = make_config(args.profile, overrides)
        configure_for(config)
        data = load_data(config)
        command = "python -m cpq_lib.train " + shlex.join(sys.argv[1:] if argv is None else argv)
        _, card = train_baseline(config, data, args.out, progress=not args.no_progress, command=command)
    except CpqError as error:  # bad input: the message says what and what is allowed; no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps({k: card[k] for k in ("epochs", "val_accuracy", "test_accuracy", "wall_time_seconds")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
