"""Grids of experiments: ``python -m cpq_lib.sweep --profile quick --out runs/sweep --grid allocation.method=uniform,classpath``.

Every combination of the grid's axes is one run of :func:`cpq_lib.experiment.run_experiment` in
``<out>/runs/<run id>``; runs share ``<out>/shared`` (the baseline and cached class scores). After each
run the records are merged into ``<out>/results.csv`` (one tidy row per run). Stopped and started
again, a sweep skips finished runs (their ``record.json``) and resumes the interrupted one from its
last checkpoint. A sweep folder may be extended with more axes or values later (for example more seeds
for some allocators): run ids come from the configuration, and a run folder whose record was made with
another configuration or other code (:func:`cpq_lib.experiment.experiment_key`) is an error naming the
differences, not silently reused (``stale="recompute"`` runs it again instead, for folders that are
caches).

Runs execute in this process (``--executor inline``), in local processes (``local``, the default: no
set-up, ``--parallel N`` at a time, spread over the GPUs) or as a Slurm job array through submitit
(``slurm``: ``--partition``, ``--gpus-per-run`` (default: 1 where the partition has GPUs, else 0),
``--parallel`` caps the array; a run that reaches its time limit is requeued and resumes from its
checkpoint). Job folders (pickled calls, logs, the ledger of submitted Slurm jobs) are in
``<out>/jobs``. A killed driver leaves its jobs running; started again, it waits for them (on Slurm
it re-attaches to the queued jobs; locally run locks make a second copy wait) instead of computing a
run twice.

Axes: ``field=v1,v2,...`` (values as JSON where they parse, else strings), or several fields that
move together, ``field1,field2=a1:a2,b1:b2`` (for example ``allocation.weight_bits,allocation.act_bits=2:2,3:3``).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterable

import pandas as pd
from submitit.helpers import Checkpointable

from .config import ExperimentConfig, make_config
from .errors import ConfigError, CpqError
from .artefacts import ArtefactKey, check_same_key
from .experiment import RECORD, STALE_POLICIES, TIDY_COLUMNS, experiment_key, read_record, run_experiment, tidy_frame
from .fileio import atomic_path
from .jobs import EXECUTORS, Call, ExecutorSettings, raise_failures, run_calls
from .pipeline import load_data
from .cpu_env import set_portable_environment
from .runtime import configure_for
from .train.distributed import init_from_environment, leave

RESULTS = "results.csv"
SHORT = {"allocation.method": "", "allocation.weight_bits": "W", "allocation.act_bits": "A", "seed": "s"}
MACHINE_FIELDS = ("data.root",)


def parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_axis(text: str) -> tuple[tuple[str, ...], list[tuple[Any, ...]]]:
    """``a.b=1,2`` -> (("a.b",), [(1,), (2,)]); ``x,y=1:2,3:4`` -> (("x", "y"), [(1, 2), (3, 4)])."""
    if "=" not in text:
        raise ConfigError(f"grid axis {text!r}: expected FIELD=V1,V2,... or FIELD1,FIELD2=A1:A2,B1:B2")
    left, right = text.split("=", 1)
    fields = tuple(f.strip() for f in left.split(",") if f.strip())
    values = []
    for item in right.split(","):
        parts = item.split(":") if len(fields) > 1 else [item]
        if len(parts) != len(fields):
            raise ConfigError(f"grid axis {text!r}: value {item!r} needs {len(fields)} parts separated by ':'")
        values.append(tuple(parse_value(p.strip()) for p in parts))
    if not fields or not values:
        raise ConfigError(f"grid axis {text!r} has no fields or no values")
    return fields, values


def combinations(axes: Iterable[tuple[tuple[str, ...], list[tuple[Any, ...]]]]) -> list[dict[str, Any]]:
    axes = list(axes)
    runs = []
    for choice in itertools.product(*[values for _, values in axes]):
        overrides: dict[str, Any] = {}
        for (fields, _), values in zip(axes, choice):
            overrides.update(zip(fields, values))
        runs.append(overrides)
    return runs


def run_id(overrides: dict[str, Any]) -> str:
    """A readable, stable folder name: the usual fields spelled out, anything else hashed."""
    parts = [f"{SHORT[k]}{overrides[k]}" for k in SHORT if k in overrides]
    rest = {k: v for k, v in overrides.items() if k not in SHORT and k not in MACHINE_FIELDS}
    if rest:
        parts.append(hashlib.sha256(json.dumps(rest, sort_keys=True, default=str).encode()).hexdigest()[:8])
    name = "-".join(str(p) for p in parts) or "default"
    return re.sub(r"[^A-Za-z0-9_.=-]", "_", name)


def _check_same_config(run_dir: Path, config: ExperimentConfig, stale: str) -> None:
    """A finished run of another configuration or code is refused (or, to recompute, removed) before any job starts."""
    record_path = run_dir / RECORD
    if not record_path.exists():
        return
    recorded = ArtefactKey.from_dict(read_record(record_path).get("artefact_key"))
    key = experiment_key(config)
    if recorded != key and stale == "recompute":
        record_path.unlink()
        return
    check_same_key(recorded, key, record_path, f"use another --out, or remove {run_dir} to run it again")


def collect(out_dir: Path) -> pd.DataFrame:
    paths = sorted((out_dir / "runs").glob(f"*/{RECORD}"))
    records = [read_record(p) for p in paths]
    frame = tidy_frame(records) if records else pd.DataFrame(columns=list(TIDY_COLUMNS))
    frame.insert(0, "run", [p.parent.name for p in paths])
    return frame


def write_results(out_dir: Path) -> pd.DataFrame:
    frame = collect(out_dir)
    with atomic_path(out_dir / RESULTS) as tmp:
        frame.to_csv(tmp, index=False)
    return frame


def _run_group(profile: str, runs: list[tuple[dict[str, Any], str]], shared_dir: str, stale: str = "refuse",
               ranks: int = 1) -> list[str]:
    if ranks > 1 and "WORLD_SIZE" not in os.environ:
        return _torchrun_group(profile, runs, shared_dir, stale, ranks)
    data_cache: dict[str, Any] = {}
    done, failed = [], []
    for overrides, run_dir in runs:
        try:
            config = make_config(profile, overrides)
            key = json.dumps(config.to_dict()["data"], sort_keys=True)
            if key not in data_cache and not (Path(run_dir) / RECORD).is_file():
                configure_for(config)
                data_cache[key] = load_data(config)
            init_from_environment(config.resolved_device())  # under torchrun: join the job's ranks
            run_experiment(config, run_dir, shared_dir=shared_dir, data=data_cache.get(key), progress=False, stale=stale)
            done.append(str(Path(run_dir) / RECORD))
        except Exception as error:  # noqa: BLE001 - reported per run below, the others still run
            failed.append(f"{Path(run_dir).name}: {type(error).__name__}: {error}")
    if failed:
        raise RuntimeError("; ".join(failed))
    return done


def _torchrun_group(profile: str, runs: list[tuple[dict[str, Any], str]], shared_dir: str, stale: str,
                    ranks: int) -> list[str]:
    """The group run by ``ranks`` processes under torchrun (one per GPU): each run's refinement is data
    parallel, its other stages run on rank 0 (:func:`cpq_lib.experiment.run_experiment`)."""
    Path(shared_dir).mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="group-", dir=shared_dir, delete=False) as handle:
        json.dump({"profile": profile, "runs": runs, "shared_dir": shared_dir, "stale": stale}, handle)
    try:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
                   "-m", "cpq_lib.sweep", "--group-file", handle.name]
        done = subprocess.run(command, capture_output=True, text=True)
    finally:
        Path(handle.name).unlink(missing_ok=True)
    if done.returncode != 0:
        raise RuntimeError(f"torchrun with {ranks} ranks failed (exit {done.returncode}): {done.stderr[-2000:]}")
    return [str(Path(run_dir) / RECORD) for _, run_dir in runs]


class RunGroup(Checkpointable):
    """Runs of a sweep, one after another, in a fresh process (a local or Slurm job); returns their
    records' paths. Every run is attempted; failures are raised together at the end.

    Checkpointable: when Slurm warns that the job's time limit is near, submitit requeues the same
    call; started again, finished runs are skipped (their records) and the interrupted one resumes
    from its last checkpoint, so the call itself is the whole checkpoint."""

    def __call__(self, profile: str, runs: list[tuple[dict[str, Any], str]], shared_dir: str,
                 stale: str = "refuse", ranks: int = 1) -> list[str]:
        return _run_group(profile, runs, shared_dir, stale, ranks)


run_group = RunGroup()


def run_sweep(profile: str, axes: list[tuple[tuple[str, ...], list[tuple[Any, ...]]]], out_dir: str | os.PathLike,
              base: dict[str, Any] | None = None, progress: bool = True,
              shared_dir: str | os.PathLike | None = None,
              executor: ExecutorSettings | str = "inline", stale: str = "refuse") -> pd.DataFrame:
    """Run every combination of ``axes`` (on top of ``base`` overrides); returns the tidy results of these
    runs (``<out>/results.csv`` lists every finished run in the folder).

    ``shared_dir`` (default ``<out>/shared``): where runs find and cache baselines and class scores.
    ``executor``: ``"inline"`` (this process), ``"local"`` (one process per run) or settings
    (:class:`cpq_lib.jobs.ExecutorSettings`: parallelism, GPUs, Slurm partition, ...). The numbers do
    not depend on it: every run seeds and configures its own runtime. ``stale``: what a finished run made
    with another configuration or other code gets (:func:`cpq_lib.experiment.run_experiment`).
    """
    if stale not in STALE_POLICIES:
        raise ConfigError(f"stale: {stale!r} is not allowed; choose one of {list(STALE_POLICIES)}")
    settings = executor if isinstance(executor, ExecutorSettings) else ExecutorSettings(kind=executor)
    out = Path(out_dir)
    shared = Path(shared_dir) if shared_dir is not None else out / "shared"
    runs = combinations(axes)
    configs = [(run_id({**(base or {}), **overrides}), make_config(profile, {**(base or {}), **overrides})) for overrides in runs]
    ids = [i for i, _ in configs]
    if len(set(ids)) != len(ids):
        raise ConfigError(f"the grid gives two runs the same id: {sorted(i for i in ids if ids.count(i) > 1)[:3]}")
    for identifier, config in configs:
        _check_same_config(out / "runs" / identifier, config, stale)
    if settings.kind != "inline":
        todo = [(i, o) for (i, _), o in zip(configs, runs) if not (out / "runs" / i / RECORD).is_file()]
        if any(config.deterministic for _, config in configs):
            set_portable_environment()  # jobs inherit it: pinned kernels before they import torch
        groups = [todo[k:k + settings.runs_per_job] for k in range(0, len(todo), settings.runs_per_job)]
        ranks = settings.gpus_per_job if settings.gpus_per_job and settings.gpus_per_job > 1 else 1  # torchrun, one rank per GPU
        calls = [Call(",".join(i for i, _ in group), run_group,
                      (profile, [({**(base or {}), **o}, str(out / "runs" / i)) for i, o in group], str(shared), stale, ranks))
                 for group in groups]
        failures = run_calls(calls, settings, out / "jobs", on_done=lambda _: write_results(out), progress=progress)
        frame = _this_grid(write_results(out), ids)
        raise_failures(failures, len(calls))
        return frame
    data_cache: dict[str, Any] = {}

    def run_here(identifier: str, config: ExperimentConfig) -> None:
        key = json.dumps(config.to_dict()["data"], sort_keys=True)
        if key not in data_cache and not (out / "runs" / identifier / RECORD).is_file():
            configure_for(config)  # before anything computes
            data_cache[key] = load_data(config)
        init_from_environment(config.resolved_device())  # under torchrun: join the ranks (refinement is data parallel)
        run_experiment(config, out / "runs" / identifier, shared_dir=shared, data=data_cache.get(key), progress=progress,
                       stale=stale)

    calls = [Call(identifier, run_here, (identifier, config)) for identifier, config in configs]
    run_calls(calls, settings, out / "jobs", on_done=lambda _: write_results(out), progress=progress)
    return _this_grid(write_results(out), ids)


def _this_grid(frame: pd.DataFrame, ids: list[str]) -> pd.DataFrame:
    """The rows of this grid's runs: a folder can also hold finished runs of another grid or of other base
    settings (results.csv lists them all), which a caller's tables must not mix in."""
    return frame[frame["run"].isin(ids)].reset_index(drop=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpq_lib.sweep", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--profile", default="quick")
    parser.add_argument("--data-root", default=None)
    parser.add_argument("--out", help="sweep folder (runs/, shared/, results.csv)")
    parser.add_argument("--grid", action="append", default=[], metavar="AXIS", help="FIELD=V1,V2 (repeatable)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override for every run")
    parser.add_argument("--no-progress", action="store_true")
    jobs = parser.add_argument_group("executor")
    jobs.add_argument("--executor", choices=EXECUTORS, default="local",
                      help="local: one process per run (default); slurm: a submitit job array; inline: this process")
    jobs.add_argument("--parallel", type=int, default=1, help="most runs at once (local processes / Slurm array cap)")
    jobs.add_argument("--gpus-per-run", "--gpus-per-job", dest="gpus_per_run", type=int, default=None,
                      help="GPUs per run; default: on Slurm 1 where the partition has GPUs (sinfo), else 0; "
                           "locally 1 if CUDA is available")
    jobs.add_argument("--runs-per-job", type=int, default=1, help="runs one job executes in turn (saves start-up)")
    jobs.add_argument("--timeout-min", type=int, default=24 * 60, help="wall-time limit per run (minutes)")
    jobs.add_argument("--partition", default=None, help="Slurm partition")
    jobs.add_argument("--account", default=None, help="Slurm account")
    jobs.add_argument("--cpus-per-run", "--cpus-per-task", dest="cpus_per_run", type=int, default=None,
                      help="CPUs per run (Slurm --cpus-per-task)")
    jobs.add_argument("--mem-gb", type=float, default=None, help="memory per run (Slurm --mem)")
    jobs.add_argument("--max-requeues", type=int, default=3,
                      help="Slurm: times a run that reaches its time limit is requeued to resume from its checkpoint")
    jobs.add_argument("--setup", action="append", default=[], metavar="LINE",
                      help="shell line run before each job, e.g. 'source .venv/bin/activate' (repeatable)")
    jobs.add_argument("--slurm", action="append", default=[], metavar="KEY=VALUE",
                      help="further sbatch option, e.g. qos=normal or constraint=h100 (repeatable)")
    parser.add_argument("--group-file", help=argparse.SUPPRESS)  # a torchrun rank of a multi-GPU run (_torchrun_group)
    args = parser.parse_args(argv)
    if args.group_file:
        group = json.loads(Path(args.group_file).read_text(encoding="utf-8"))
        _run_group(group["profile"], [(o, d) for o, d in group["runs"]], group["shared_dir"], group["stale"])
        leave()  # on success only: a rank that failed exits and torchrun stops the others
        return 0
    if not args.out:
        parser.error("--out is required")
    if Path(args.out).exists() and not Path(args.out).is_dir():
        parser.error(f"--out {args.out} is a file; give a folder")
    base: dict[str, Any] = {"data.root": args.data_root} if args.data_root else {}
    try:
        for item in args.set:
            if "=" not in item:
                raise ConfigError(f"--set expects FIELD=VALUE, got {item!r}")
            key, value = item.split("=", 1)
            base[key] = parse_value(value)
        axes = [parse_axis(text) for text in args.grid]
        slurm_args = {}
        for item in args.slurm:
            if "=" not in item:
                raise ConfigError(f"--slurm expects KEY=VALUE (an sbatch option without dashes), got {item!r}")
            key, value = item.split("=", 1)
            slurm_args[key.strip().replace("-", "_")] = value
        settings = ExecutorSettings(kind=args.executor, parallel=args.parallel, gpus_per_job=args.gpus_per_run,
                                    timeout_min=args.timeout_min, runs_per_job=args.runs_per_job, partition=args.partition,
                                    account=args.account, cpus_per_task=args.cpus_per_run, mem_gb=args.mem_gb,
                                    setup=tuple(args.setup), slurm_args=slurm_args, max_requeues=args.max_requeues)
        frame = run_sweep(args.profile, axes, args.out, base, progress=not args.no_progress, executor=settings)
    except CpqError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"{len(frame)} finished run(s); results in {Path(args.out) / RESULTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
