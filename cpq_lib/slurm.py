"""What the Slurm executor needs beyond submitit: a partition's resources, job states on clusters
without accounting, and the jobs a killed driver left running.

- **Resources.** ``sinfo`` says what a partition's nodes have (CPUs, memory, GPUs from their generic
  resources); a request that cannot be met is an error naming the partition and what it has, before
  anything is submitted (``sbatch`` itself only says "Invalid generic resource (gres) specification").
  GPUs per run default to 1 where the partition has GPUs, else 0, so a CPU partition works as it is.
- **Job states.** submitit asks ``sacct``, which needs the accounting database many small clusters do
  not run; it then warns at every poll and cannot see a job that Slurm killed (time limit, memory,
  ``scancel``) before it wrote a result, so a driver would wait forever. :class:`QueueWatcher` checks
  once whether accounting answers, says so once if not, and reads states from ``squeue`` instead
  (which lists ended jobs for ``MinJobAge`` seconds; a job it no longer lists has ended).
- **Re-attaching.** Submitted job ids are kept in a ledger in the sweep's job folder; a driver started
  again waits for those still pending or running instead of submitting their runs a second time.

Written here because submitit has no hook for any of the three (its watcher is a class attribute of
its job class, which :class:`SlurmJob` replaces).
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import submitit
from submitit.slurm.slurm import SlurmInfoWatcher

from .errors import ConfigError
from .fileio import atomic_path

LOG = logging.getLogger(__name__)
LEDGER = "submitted.json"
# Slurm's job states in which a job will still run or is running (squeue's long names).
ALIVE = frozenset({"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD",
                   "REQUEUE_FED", "RESIZING", "SUSPENDED", "STAGE_OUT", "SIGNALING", "READY"})
ENDED = "ENDED"  # a job squeue no longer lists: it ended more than MinJobAge seconds ago

Runner = Callable[..., subprocess.CompletedProcess]


@dataclass(frozen=True)
class Partition:
    """One partition's largest node: what a single-node job can get there."""

    name: str
    nodes: int
    cpus: int
    memory_mb: int
    gpus: int
    gres: str
    default: bool = False

    def describe(self) -> str:
        return (f"{self.nodes} node(s), at most {self.cpus} CPUs, {self.memory_mb / 1024:.0f} GiB and "
                f"{self.gpus} GPU(s) per node (gres: {self.gres or 'none'})")


def gres_gpus(gres: str) -> int:
    """GPUs in a node's generic resources, as ``sinfo %G`` prints them: ``gpu:4``, ``gpu:a100:4(S:0-1)``,
    ``gpu:a100:2,gpu:v100:2``, ``(null)``."""
    total = 0
    for entry in re.sub(r"\([^)]*\)", "", gres).split(","):
        parts = entry.strip().split(":")
        if parts[0] == "gpu" and len(parts) >= 2 and parts[-1].isdigit():
            total += int(parts[-1])
    return total


def _leading_int(text: str) -> int:
    match = re.match(r"\d+", text.strip())
    return int(match.group()) if match else 0


def parse_sinfo(output: str) -> list[Partition]:
    """Lines of ``sinfo -h -o '%P|%D|%c|%m|%G'`` (one per partition and node configuration) merged
    into one entry per partition, keeping its largest node."""
    merged: dict[str, Partition] = {}
    for line in output.splitlines():
        if not line.strip():
            continue
        name, nodes, cpus, memory, gres = (line.split("|") + [""] * 5)[:5]
        default = name.endswith("*")
        name = name.rstrip("*")
        gres = "" if gres.strip() in ("(null)", "") else gres.strip()
        entry = Partition(name, _leading_int(nodes), _leading_int(cpus), _leading_int(memory), gres_gpus(gres), gres,
                          default)
        if name in merged:
            old = merged[name]
            bigger = entry if (entry.gpus, entry.cpus, entry.memory_mb) > (old.gpus, old.cpus, old.memory_mb) else old
            entry = Partition(name, old.nodes + entry.nodes, max(old.cpus, entry.cpus),
                              max(old.memory_mb, entry.memory_mb), max(old.gpus, entry.gpus), bigger.gres,
                              old.default or entry.default)
        merged[name] = entry
    return list(merged.values())


def _run(command: list[str], runner: Runner = subprocess.run) -> subprocess.CompletedProcess:
    return runner(command, capture_output=True, text=True, timeout=60)


def partitions(runner: Runner = subprocess.run) -> list[Partition]:
    result = _run(["sinfo", "-h", "-o", "%P|%D|%c|%m|%G"], runner)
    if result.returncode != 0:
        raise ConfigError(f"sinfo failed, so the cluster's partitions are unknown: {result.stderr.strip()}")
    return parse_sinfo(result.stdout)


@dataclass(frozen=True)
class Request:
    """What each job asks for, resolved against its partition."""

    partition: Partition
    gpus: int
    cpus: int | None
    mem_gb: float | None


def resolve_request(partition: str | None, gpus: int | None, cpus: int | None, mem_gb: float | None,
                    available: Iterable[Partition]) -> Request:
    """The partition (``None``: the cluster's default) and per-job resources, or a ConfigError naming
    the partition and what its nodes have when the request cannot be met."""
    available = list(available)
    names = [p.name for p in available]
    if partition is None:
        defaults = [p for p in available if p.default]
        if not defaults:
            raise ConfigError(f"this cluster has no default partition; pass --partition, one of {names}")
        chosen = defaults[0]
    else:
        matches = [p for p in available if p.name == partition]
        if not matches:
            raise ConfigError(f"partition {partition!r} does not exist on this cluster; choose one of {names}")
        chosen = matches[0]
    gpus = (1 if chosen.gpus else 0) if gpus is None else gpus
    problems = []
    if gpus > chosen.gpus:
        with_gpus = [p.name for p in available if p.gpus >= gpus]
        problems.append(f"{gpus} GPU(s) per run" + (f" (partitions with that many: {with_gpus})" if with_gpus else "")
                        + ("; --gpus-per-run 0 runs on its CPUs" if chosen.gpus == 0 else ""))
    if cpus is not None and cpus > chosen.cpus:
        problems.append(f"{cpus} CPUs per run")
    if mem_gb is not None and chosen.memory_mb and mem_gb * 1024 > chosen.memory_mb:
        problems.append(f"{mem_gb:g} GB per run")
    if problems:
        raise ConfigError(f"partition {chosen.name!r} cannot give {' and '.join(problems)}: it has {chosen.describe()}")
    return Request(chosen, gpus, cpus, mem_gb)


def accounting_available(runner: Runner = subprocess.run) -> tuple[bool, str]:
    """Whether ``sacct`` answers on this cluster, and what it said if not."""
    try:
        result = _run(["sacct", "-X", "-n", "-o", "JobID", "-S", "now"], runner)
    except (OSError, subprocess.TimeoutExpired) as error:
        return False, str(error)
    return result.returncode == 0, (result.stderr or result.stdout).strip()


def parse_squeue(output: str) -> dict[str, str]:
    """``squeue -h -o '%i|%T'`` lines -> {job id: state}; pending array ranges (``12_[3-5%2]``) expand."""
    from submitit.slurm.slurm import read_job_id

    states: dict[str, str] = {}
    for line in output.splitlines():
        if "|" not in line:
            continue
        job, state = (part.strip() for part in line.split("|", 1))
        for split in read_job_id(job):
            if len(split) >= 3:
                for index in range(int(split[1]), int(split[2]) + 1):
                    states[f"{split[0]}_{index}"] = state
            else:
                states["_".join(split[:2])] = state
    return states


def queue_states(job_ids: Iterable[str], runner: Runner = subprocess.run) -> dict[str, str]:
    """States of the given jobs from ``squeue`` (ended ones too, for ``MinJobAge``); a job it does not
    list has ended (:data:`ENDED`). Raises ConfigError when squeue itself fails."""
    job_ids = sorted(set(job_ids))
    if not job_ids:
        return {}
    parents = sorted({j.split("_")[0] for j in job_ids})
    result = _run(["squeue", "-h", "-t", "all", "-o", "%i|%T", "-j", ",".join(parents)], runner)
    if result.returncode != 0 and "Invalid job id" not in result.stderr:
        raise ConfigError(f"squeue failed: {result.stderr.strip()}")
    listed = parse_squeue(result.stdout)
    return {j: listed.get(j, ENDED) for j in job_ids}


class QueueWatcher(SlurmInfoWatcher):
    """submitit's job-state watcher, reading ``squeue`` where ``sacct`` does not answer (checked once,
    said once)."""

    def __init__(self, delay_s: int = 60) -> None:
        super().__init__(delay_s=delay_s)
        self.accounting: bool | None = None

    def update(self) -> None:
        if self.accounting is None:
            self.accounting, said = accounting_available()
            if not self.accounting:
                LOG.warning("Slurm accounting does not answer on this cluster (sacct: %s); job states come from squeue",
                            said.splitlines()[0] if said else "no output")
        if self.accounting:
            super().update()
            return
        to_check = self._registered - self._finished
        if not to_check:
            return
        self._num_calls += 1
        try:
            states = queue_states(to_check)
        except (ConfigError, OSError, subprocess.TimeoutExpired) as error:
            LOG.warning("could not read job states (%s); trying again at the next poll", error)
            return
        self._info_dict.update({job: {"JobID": job, "State": state} for job, state in states.items()})
        self._last_status_check = time.time()
        for job in to_check:
            if self.is_done(job, mode="cache"):
                self._finished.add(job)


# States in which Slurm stopped a job from outside: the job cannot write a result after them.
NO_RESULT = frozenset({"CANCELLED", "OUT_OF_MEMORY", "NODE_FAIL", "BOOT_FAIL", "DEADLINE"})


class SlurmJob(submitit.SlurmJob):
    watcher = QueueWatcher(delay_s=60)

    def _get_outcome_and_result(self) -> tuple[str, Any]:
        """submitit waits 15 s for a result file that a slow shared file system may not show yet; a job
        that Slurm cancelled or killed for memory writes none, so its failure is reported after 2 s."""
        state = self.watcher.get_state(self.job_id, mode="cache").split()[0]
        if state in NO_RESULT:
            self._results_timeout_s = 2
        return super()._get_outcome_and_result()


class SlurmExecutor(submitit.SlurmExecutor):
    """submitit's Slurm executor with :class:`SlurmJob` (states without accounting)."""

    job_class = SlurmJob


def read_ledger(folder: Path) -> dict[str, str]:
    """{call name: job id} of the jobs submitted from this job folder (empty when there is none)."""
    path = folder / LEDGER
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        LOG.warning("%s is damaged; its jobs are not re-attached", path)
        return {}
    return {str(k): str(v) for k, v in data.items()} if isinstance(data, dict) else {}


def write_ledger(folder: Path, entries: dict[str, str]) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    ledger = {**read_ledger(folder), **entries}
    with atomic_path(folder / LEDGER) as tmp:
        Path(tmp).write_text(json.dumps(ledger, indent=1, sort_keys=True), encoding="utf-8")


def still_queued(names: Iterable[str], folder: Path, runner: Runner = subprocess.run) -> dict[str, str]:
    """{call name: job id} for the calls whose earlier job is still pending or running."""
    wanted = set(names)
    ledger = {name: job for name, job in read_ledger(folder).items() if name in wanted}
    if not ledger:
        return {}
    states = queue_states(ledger.values(), runner)
    return {name: job for name, job in ledger.items() if states.get(job) in ALIVE}


def attach(folder: Path, job_id: str) -> Any:
    """A job object for a job submitted earlier from ``folder`` (``<folder>/%j``)."""
    return SlurmJob(folder=folder / "%j", job_id=job_id)
