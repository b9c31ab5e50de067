"""Train a full-precision baseline: ``python -m cpq_lib.train --profile cifar10 --data-root <zip> --out <dir>``.

Killed runs resume from ``<out>/state.pt`` when started again with the same arguments. On several GPUs
(or CPU processes): ``python -m torch.distributed.run --nproc-per-node N -m cpq_lib.train ...`` trains
with DistributedDataParallel, the global batch ``train.batch_size`` split between the ranks; rank 0
writes the files, and a killed run resumes from them on any number of ranks.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys

from ..cli import check_output_folder, fail, parse_overrides
from ..config import PROFILES, make_config
from ..errors import CpqError
from ..pipeline import load_data, train_baseline
from ..runtime import configure_for
from .distributed import init_from_environment, is_writer, leave


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.train", description=__doc__)
    parser.add_argument("--profile", default="quick", choices=PROFILES)
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", required=True, help="folder for state.pt, log.jsonl, model.pt and model.json")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="config override, e.g. train.epochs=80 (repeatable)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    try:  # everything is checked before data is loaded
        check_output_folder(args.out)
        overrides = {**({"data.root": args.data_root} if args.data_root else {}), **parse_overrides(args.set)}
        config = make_config(args.profile, overrides)
        config.resolved_device()
    except ValueError as error:
        return fail(str(error))
    try:
        configure_for(config)
        init_from_environment(config.resolved_device())
        data = load_data(config)
        command = "python -m cpq_lib.train " + shlex.join(sys.argv[1:] if argv is None else argv)
        _, card = train_baseline(config, data, args.out, progress=not args.no_progress, command=command)
    except CpqError as error:  # bad input: the message says what and what is allowed; no traceback
        print(f"error: {error}", file=sys.stderr)
        return 2
    if is_writer():
        print(json.dumps({k: card[k] for k in ("epochs", "val_accuracy", "test_accuracy", "wall_time_seconds")}))
    leave()
    return 0


if __name__ == "__main__":
    sys.exit(main())
