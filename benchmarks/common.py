"""Timing helpers: variants timed alternately in one process, median of repeats, reported as ratios."""

from __future__ import annotations

import datetime
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def time_alternating(variants: dict[str, Callable[[], None]], repeats: int, warmup: int = 2) -> dict[str, list[float]]:
    """Run each variant ``warmup`` times, then ``repeats`` rounds of one call each, in alternating order."""
    for fn in variants.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {name: [] for name in variants}
    names = list(variants)
    for round_index in range(repeats):
        order = names if round_index % 2 == 0 else names[::-1]
        for name in order:
            started = time.perf_counter()
            variants[name]()
            times[name].append(time.perf_counter() - started)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def paired_ratio(times: dict[str, list[float]], variant: str, baseline: str) -> float:
    """Median over rounds of ``variant / baseline`` timed back to back in the same round.

    This machine's speed drifts and spikes over seconds (other tenants); a round's two timings share
    that state, so the median of per-round ratios is steadier than the ratio of medians.
    """
    return statistics.median(v / b for v, b in zip(times[variant], times[baseline], strict=True))


def machine() -> dict:
    return {"torch": str(torch.__version__), "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine()}


def save(name: str, payload: dict) -> Path:
    """Write ``results/<name>.json`` atomically, with the command, commit and date that produced it."""
    from cpq_lib.fileio import atomic_write_json
    from cpq_lib.provenance import git_commit

    RESULTS.mkdir(exist_ok=True)
    path = RESULTS / f"{name}.json"
    record = {"command": "python " + shlex.join(["benchmarks/" + Path(sys.argv[0]).name, *sys.argv[1:]]),
              "git_commit": git_commit(), "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
              **payload}
    atomic_write_json(record, path)
    return path


def resnet20():
    """The shipped CIFAR-10 ResNet-20, or a seeded random one where the package ships none (eval mode)."""
    from cpq_lib.models import available_pretrained, build_model, load_pretrained

    if ("resnet20", "cifar10") in available_pretrained():
        model, _ = load_pretrained("resnet20", "cifar10")
    else:
        torch.manual_seed(0)
        model = build_model("resnet20", 10)
    return model.eval()
