"""What the `quick` profile's portable numerics cost: training the digits CNN in float64 vs float32.

    .venv/bin/python benchmarks/bench_precision.py [--repeats 5] [--epochs 5]

`quick` computes in float64 with MKL on its COMPATIBLE branch (cpq_lib.runtime, cpq_lib.cpu_env).
Variants, each in a fresh process (MKL reads its branch once per process) with one thread and the
pinned code paths: float32; float64 (what `quick` runs); float64 with MKL's automatic branch. Every
round runs each variant once, in alternating order; a variant's time is `epochs` training epochs
(validation included) after one warm-up epoch, measured inside the process. Ratios are medians of
per-round ratios to float32.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import machine, median, paired_ratio, save  # noqa: E402

VARIANTS = {
    "float32": ("float32", {}),
    "float64": ("float64", {}),
    "float64, MKL automatic branch": ("float64", {"MKL_CBWR": "AUTO"}),
}
BASELINE = "float32"


def worker(dtype: str, epochs: int) -> float:
    """Seconds for ``epochs`` epochs of the quick baseline's training in this process."""
    import dataclasses

    import torch

    from cpq_lib.config import make_config
    from cpq_lib.models import build_model
    from cpq_lib.pipeline import load_data, model_kwargs
    from cpq_lib.runtime import configure_for
    from cpq_lib.train import train_model

    config = make_config("quick", {"dtype": dtype})
    configure_for(config)
    data = load_data(config)
    model = build_model(config.model.name, **model_kwargs(config, data))
    train_model(model, data, dataclasses.replace(config.train, epochs=1), seed=0, progress=False)  # warm-up
    assert next(model.parameters()).dtype == getattr(torch, dtype)
    result = train_model(model, data, dataclasses.replace(config.train, epochs=epochs), seed=0, progress=False)
    return result.seconds


def measure(name: str, epochs: int) -> float:
    dtype, extra = VARIANTS[name]
    from cpq_lib.cpu_env import PORTABLE_CPU_ENV, set_portable_environment

    env = {k: v for k, v in os.environ.items() if k not in PORTABLE_CPU_ENV}
    env.update(extra)
    set_portable_environment(env)
    out = subprocess.run([sys.executable, __file__, "--worker", dtype, "--epochs", str(epochs)], env=env,
                         capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--worker", choices=("float32", "float64"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(worker(args.worker, args.epochs))
        return 0
    names = list(VARIANTS)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(args.repeats):
        for name in names if round_index % 2 == 0 else names[::-1]:
            times[name].append(measure(name, args.epochs))
    ratios = {name: round(paired_ratio(times, name, BASELINE), 3) for name in names if name != BASELINE}
    record = {"benchmark": "quick digits CNN training: float64 vs float32", "epochs": args.epochs,
              "repeats": args.repeats, "machine": machine(), "median_seconds": {n: round(median(t), 3) for n, t in times.items()},
              "seconds": times, "ratio_to_float32": ratios}
    path = save("bench_precision", record)
    print(json.dumps({"median_seconds": record["median_seconds"], "ratio_to_float32": ratios}))
    print(f"record: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
