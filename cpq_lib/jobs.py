"""Where the runs of a sweep execute: in this process, in local processes, or as Slurm jobs.

Local processes and Slurm go through submitit, which pickles a call (function and arguments) into a job
folder, runs it in a fresh Python process and pickles back its result or its exception with the
traceback; its ``LocalExecutor`` needs no set-up, its ``SlurmExecutor`` writes and submits the sbatch
script (job arrays, array parallelism, requeueing on the time-limit signal) on a cluster. What submitit
leaves to us: a cap on how many local processes run at once (its local executor starts every job it is
given), spreading local jobs over the GPUs, collecting failures into one error that names each run and
its log, and on Slurm what :mod:`cpq_lib.slurm` adds (requests checked against the partition, job
states without accounting, re-attaching to running jobs).

Jobs outlive a killed driver (submitit's controllers are meant to). Started again, a Slurm driver waits
for the jobs it had submitted that are still queued or running; locally, it submits the unfinished runs
again, and the run lock in :func:`cpq_lib.experiment.run_experiment` makes a second copy of a still
running job wait for the first and then read its record.
"""

from __future__ import annotations

import itertools
import re
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable

from .errors import ConfigError, CpqError
from .progress import progress as progress_bar

if TYPE_CHECKING:
    from .slurm import Request

EXECUTORS = ("inline", "local", "slurm")


class SweepError(CpqError):
    """Some runs of a sweep failed; the message names them and where their logs are."""


@dataclass(frozen=True)
class ExecutorSettings:
    """How sweep runs are executed.

    ``parallel``: most runs at once (local processes; on Slurm the array's parallelism cap).
    ``gpus_per_job``: GPUs per run; None means, on Slurm, 1 where the partition's nodes have GPUs (per
    ``sinfo``) and 0 elsewhere, and locally 1 when CUDA is available (0 otherwise); local
    jobs are spread round-robin over ``local_gpus`` devices (several jobs may share one GPU: ResNet-20
    steps are bound by kernel launches, so separate processes overlap on the device).
    ``timeout_min``: wall-time limit of each job (Slurm ``--time``; local jobs are stopped after it).
    ``setup``: shell lines run before each job (``module load ...``, ``source venv/bin/activate``).
    ``slurm_args``: further sbatch options, e.g. ``{"qos": "normal", "constraint": "h100"}``.
    ``max_requeues``: how often Slurm may requeue a job that reached its time limit (submitit checkpoints
    a :class:`submitit.helpers.Checkpointable` call on the warning signal and requeues it; a sweep's runs
    resume from their last checkpoint).
    ``runs_per_job``: runs one job executes in turn; a fresh process costs seconds (imports, compiled
    kernels), which is most of a `quick` run, so small runs are worth grouping.
    """

    kind: str = "local"
    parallel: int = 1
    gpus_per_job: int | None = None
    local_gpus: int | None = None
    timeout_min: int = 24 * 60
    partition: str | None = None
    account: str | None = None
    cpus_per_task: int | None = None
    mem_gb: float | None = None
    setup: tuple[str, ...] = ()
    slurm_args: dict[str, Any] = field(default_factory=dict)
    runs_per_job: int = 1
    max_requeues: int = 3
    job_name: str = "cpq-sweep"
    poll_seconds: float = 0.5

    def __post_init__(self) -> None:
        if self.kind not in EXECUTORS:
            raise ConfigError(f"executor {self.kind!r} is not known; choose one of {list(EXECUTORS)}")
        if self.parallel < 1:
            raise ConfigError(f"parallel must be >= 1, got {self.parallel}")
        if self.gpus_per_job is not None and self.gpus_per_job < 0:
            raise ConfigError(f"gpus_per_job must be >= 0, got {self.gpus_per_job}")
        if self.runs_per_job < 1:
            raise ConfigError(f"runs_per_job must be >= 1, got {self.runs_per_job}")
        if self.max_requeues < 0:
            raise ConfigError(f"max_requeues must be >= 0, got {self.max_requeues}")
        if self.timeout_min < 1:
            raise ConfigError(f"timeout_min must be >= 1 minute, got {self.timeout_min}")
        if self.kind != "slurm" and (self.partition or self.account or self.slurm_args):
            raise ConfigError(f"partition, account and Slurm options need executor 'slurm', not {self.kind!r}")


@dataclass(frozen=True)
class Call:
    """One unit of work: ``function(*args)`` under a readable name (the run id)."""

    name: str
    function: Callable[..., Any]
    args: tuple[Any, ...]


@dataclass
class Failure:
    name: str
    error: str
    log: str | None = None


def _local_gpus(settings: ExecutorSettings) -> int:
    if settings.local_gpus is not None:
        return settings.local_gpus
    import torch

    return torch.cuda.device_count()


def local_executor(settings: ExecutorSettings, folder: Path, index: int):
    """submitit's LocalExecutor for the ``index``-th job (its GPU chosen round-robin)."""
    import submitit

    executor = submitit.LocalExecutor(folder=folder)
    available = _local_gpus(settings)
    gpus = settings.gpus_per_job if settings.gpus_per_job is not None else min(1, available)
    if gpus > max(available, 0) and settings.gpus_per_job is not None:
        raise ConfigError(f"gpus_per_job={gpus} but this machine has {available} CUDA device(s)")
    visible = tuple((index * gpus + k) % available for k in range(gpus)) if gpus else ()
    executor.update_parameters(timeout_min=settings.timeout_min, gpus_per_node=gpus, visible_gpus=visible,
                               setup=list(settings.setup))
    return executor


def _check_slurm_tools() -> None:
    missing = [tool for tool in ("sbatch", "srun", "squeue", "sinfo") if shutil.which(tool) is None]
    if missing:
        raise ConfigError(f"executor 'slurm' needs Slurm's {', '.join(missing)} on PATH: start the sweep on a login "
                          "node of the cluster (or use --executor local)")


def _mem(mem_gb: float) -> str:
    return f"{mem_gb:g}GB" if float(mem_gb).is_integer() else f"{round(mem_gb * 1024)}MB"


def slurm_executor(settings: ExecutorSettings, folder: Path, request: Request | None = None):
    """A Slurm executor for one array of jobs, each asking for ``request`` (resolved from ``sinfo`` when not given)."""
    from .slurm import SlurmExecutor, partitions, resolve_request

    _check_slurm_tools()
    if request is None:
        request = resolve_request(settings.partition, settings.gpus_per_job, settings.cpus_per_task, settings.mem_gb,
                                  partitions())
    executor = SlurmExecutor(folder=folder / "%j", max_num_timeout=settings.max_requeues)
    known = SlurmExecutor._valid_parameters()
    extra = {key: value for key, value in settings.slurm_args.items() if key in known}
    others = {key.replace("_", "-"): value for key, value in settings.slurm_args.items() if key not in known}
    executor.update_parameters(
        job_name=settings.job_name, time=settings.timeout_min, nodes=1, ntasks_per_node=1,
        gpus_per_node=request.gpus or None, cpus_per_task=request.cpus,
        mem=_mem(request.mem_gb) if request.mem_gb is not None else None, partition=request.partition.name,
        account=settings.account, array_parallelism=settings.parallel, setup=list(settings.setup),
        **({"additional_parameters": others} if others else {}), **extra,
    )
    return executor


def submit_slurm(calls: list[Call], settings: ExecutorSettings, folder: Path) -> list[tuple[Call, Any]]:
    """Submit ``calls`` as one job array, except those whose job from an earlier driver (the ledger in
    ``folder``) is still pending or running: those are waited for, not computed twice."""
    from .slurm import attach, partitions, resolve_request, still_queued, write_ledger

    _check_slurm_tools()
    request = resolve_request(settings.partition, settings.gpus_per_job, settings.cpus_per_task, settings.mem_gb,
                              partitions())  # before anything is submitted
    queued = still_queued([call.name for call in calls], folder)
    if queued:
        print(f"{len(queued)} run(s) still queued or running from an earlier start: waiting for their jobs "
              f"({', '.join(sorted(queued.values()))})", file=sys.stderr)
    fresh = [call for call in calls if call.name not in queued]
    submitted: dict[str, Any] = {}
    if fresh:
        executor = slurm_executor(settings, folder, request)
        try:
            with executor.batch():  # one sbatch --array for the whole grid
                jobs = [executor.submit(call.function, *call.args) for call in fresh]
        except Exception as error:  # submitit raises its own error carrying sbatch's message
            raise SweepError(f"sbatch refused the job array on partition {request.partition.name!r} "
                             f"({request.partition.describe()}): {error}") from error
        # submitit makes array tasks its own job objects; ours read states where sacct does not answer
        submitted = {call.name: attach(folder, job.job_id) for call, job in zip(fresh, jobs)}
        write_ledger(folder, {name: job.job_id for name, job in submitted.items()})
    return [(call, submitted[call.name] if call.name in submitted else attach(folder, queued[call.name]))
            for call in calls]


def _error_line(message: str) -> str:
    """The exception line of a job's traceback (submitit wraps it between dashed lines), else the first line."""
    blocks = re.split(r"^-{10,}$", message, flags=re.M)
    body = blocks[1] if len(blocks) >= 3 else message
    lines = [line.strip() for line in body.strip().splitlines() if line.strip()]
    return (lines[-1] if len(blocks) >= 3 else lines[0]) if lines else ""


def _failure(call: Call, job: Any) -> Failure | None:
    from submitit.core.utils import FailedJobError, UncompletedJobError

    try:
        job.result()
    except FailedJobError as error:  # the call raised: submitit re-raises it with the job's traceback
        return Failure(call.name, _error_line(str(error)) or type(error).__name__, str(job.paths.stderr))
    except UncompletedJobError:  # no result file: the scheduler ended the job (time limit, memory, scancel)
        log = job.paths.stderr
        state = job.watcher.get_state(job.job_id, mode="cache")
        return Failure(call.name, f"job {job.job_id} ended without a result (state: {state}; killed by its time "
                       "limit, its memory limit or scancel?)", str(log))
    except Exception as error:  # submitit re-raises the job's exception (FailedJobError with the traceback)
        log = getattr(getattr(job, "paths", None), "stderr", None)
        return Failure(call.name, _error_line(str(error)) or type(error).__name__, str(log) if log else None)
    return None


def run_calls(calls: Iterable[Call], settings: ExecutorSettings, folder: str | Path,
              on_done: Callable[[Call], None] | None = None, progress: bool = True) -> list[Failure]:
    """Run ``calls`` as ``settings`` say; ``on_done`` after each finished one (in this process, in the
    order they finish). Returns the failures (a failed run does not stop the others)."""
    calls = list(calls)
    folder = Path(folder)
    failures: list[Failure] = []
    bar = progress_bar(None, progress, total=len(calls), desc=f"sweep ({settings.kind})")

    def finished(call: Call, failure: Failure | None) -> None:
        if failure is not None:
            failures.append(failure)
        elif on_done is not None:
            on_done(call)
        bar.update(1)

    try:
        if settings.kind == "inline":
            for call in calls:
                call.function(*call.args)  # errors propagate: in this process a traceback is the best report
                finished(call, None)
        else:
            _run_jobs(calls, settings, folder, finished)
    finally:
        bar.close()
    return failures


def _run_jobs(calls: list[Call], settings: ExecutorSettings, folder: Path,
              finished: Callable[[Call, Failure | None], None]) -> None:

    if settings.kind == "slurm":
        pending = submit_slurm(calls, settings, folder)
        queue: list[Call] = []
    else:
        pending, queue = [], list(calls)
    counter = itertools.count()
    while pending or queue:
        while queue and len(pending) < settings.parallel:
            call = queue.pop(0)
            executor = local_executor(settings, folder, next(counter))
            pending.append((call, executor.submit(call.function, *call.args)))
        still = []
        for call, job in pending:
            if job.done():
                finished(call, _failure(call, job))
            else:
                still.append((call, job))
        pending = still
        if pending:
            time.sleep(settings.poll_seconds)


def raise_failures(failures: list[Failure], total: int) -> None:
    if failures:
        lines = [f"  {f.name}: {f.error}" + (f" (log: {f.log})" if f.log else "") for f in failures]
        raise SweepError(f"{len(failures)} of {total} run(s) failed:\n" + "\n".join(lines))
