"""Sweeps on a real Slurm cluster (tests/slurm_cluster.py: one node, no accounting): a quick grid as one
job array, a killed driver started again, a run past its time limit requeued and resumed, a failing
run named with its log, a job killed by Slurm reported instead of waited for, and a request the
partition cannot meet refused before anything is submitted.

Skipped with the reason where Slurm cannot start (not root, packages not installable); a failure
when ``CI=true``, since CI installs it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import cloudpickle
import pandas as pd
import pytest
from submitit.helpers import Checkpointable

from cpq_lib.errors import ConfigError
from cpq_lib.jobs import Call, ExecutorSettings, run_calls, submit_slurm
from cpq_lib.slurm import LEDGER, read_ledger

from slurm_cluster import ClusterUnavailable, SlurmCluster

cloudpickle.register_pickle_by_value(sys.modules[__name__])  # job processes cannot import the test module

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cluster():
    try:
        started = SlurmCluster().start()
    except ClusterUnavailable as error:
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"CI=true but the test Slurm cluster did not start: {error}")
        pytest.skip(f"no test Slurm cluster: {error}")
    yield started
    started.stop()


@pytest.fixture(autouse=True)
def _empty_queue(request):
    yield
    if "cluster" in request.fixturenames:
        request.getfixturevalue("cluster").cancel_all()


def _wait_for(condition, timeout_s: float, what: str, poll_s: float = 0.2):
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout_s:.0f} s"
        time.sleep(poll_s)


def fail_with(message: str) -> None:
    raise RuntimeError(message)


def sleep_for(seconds: float) -> str:
    time.sleep(seconds)
    return "slept"


class StepsUntilRequeued(Checkpointable):
    """One-second steps with progress on disk: the first attempt steps until Slurm's time-limit signal
    stops it (or the limit kills it: then the test fails), a requeued attempt continues from the saved
    progress for ``more`` steps. Each start is logged with the progress it found."""

    def __call__(self, folder: str, more: int) -> int:
        progress, attempts = Path(folder, "progress"), Path(folder, "attempts")
        attempt = int(os.environ.get("SLURM_RESTART_COUNT", "0"))
        done = int(progress.read_text()) if progress.exists() else 0
        with attempts.open("a") as log:
            log.write(f"{attempt} {done}\n")
        while attempt == 0 or done < int(attempts.read_text().splitlines()[1].split()[1]) + more:
            time.sleep(1.0)
            done += 1
            progress.write_text(str(done))
        return done


QUICK = ["--grid", "allocation.method=uniform,random", "--set", "refine.epochs=2", "--no-progress",
         "--executor", "slurm", "--parallel", "2", "--timeout-min", "30"]


def _refine_epochs(run: Path) -> list[int]:
    return [json.loads(line)["epoch"] for line in (run / "refine_log.jsonl").read_text().splitlines() if line]


def test_a_quick_grid_runs_as_one_array_and_a_killed_driver_started_again_waits_for_it(cluster, tmp_path,
                                                                                        quick_baseline_dir):
    """A quick grid on the default (CPU) partition is one job array asking for no GPU. Its driver is
    killed while both array tasks run; they are suspended (so that they cannot finish before the second
    start looks at them), the driver started again, then they are resumed: it waits for them, computes
    nothing twice, and says once that accounting is absent instead of warning at every poll."""
    out = tmp_path / "sweep"
    shutil.copytree(quick_baseline_dir, out / "shared" / "baseline")
    command = [sys.executable, "-m", "cpq_lib.sweep", "--out", str(out), *QUICK]
    driver = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, env=dict(os.environ))
    _wait_for(lambda: (out / "jobs" / LEDGER).is_file() and sum(s == "RUNNING" for _, s in cluster.queue()) == 2,
              120, "both array tasks running")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    ledger = read_ledger(out / "jobs")
    subprocess.run(["scontrol", "suspend", ",".join(ledger.values())], check=True)
    assert not list((out / "runs").glob("*/record.json"))  # killed while the runs were still computing
    again = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env=dict(os.environ))
    said = ""
    while "still queued" not in said and (line := again.stderr.readline()):  # what the driver says before it waits
        said += line
    subprocess.run(["scontrol", "resume", ",".join(ledger.values())], check=True)
    assert "2 run(s) still queued or running from an earlier start" in said, said + again.stderr.read()[-3000:]
    _, rest = again.communicate(timeout=600)
    assert again.returncode == 0, (said + rest)[-3000:]
    assert read_ledger(out / "jobs") == ledger and len(ledger) == 2 and len({j.split("_")[0] for j in ledger.values()}) == 1
    (script,) = (out / "jobs").glob("*/*_submission.sh")  # one sbatch script: one array for the grid, submitted once
    text = script.read_text()
    assert "#SBATCH --array=0-1%2" in text and "gpus-per-node" not in text  # a CPU partition: no gres asked
    for run in (out / "runs").iterdir():  # each epoch ran once: nothing was computed twice
        assert _refine_epochs(run) == [1, 2], run.name
    frame = pd.read_csv(out / "results.csv")
    assert sorted(frame["allocator"]) == ["random", "uniform"] and frame["test_after"].between(0, 100).all()
    stderr = said + rest
    assert stderr.count("accounting does not answer") == 1 and "squeue" in stderr  # said once, not at every poll
    assert "sacct error" not in stderr


def test_a_run_past_its_time_limit_is_requeued_and_resumes(cluster, tmp_path):
    """A 1-minute limit (Slurm's shortest) with the warning signal 50 s before it: submitit checkpoints
    the call and requeues it as timed out; the second attempt continues from the progress the first left."""
    work = tmp_path / "work"
    work.mkdir()
    settings = ExecutorSettings(kind="slurm", timeout_min=1, slurm_args={"signal_delay_s": 50}, poll_seconds=1.0)
    failures = run_calls([Call("long", StepsUntilRequeued(), (str(work), 3))], settings, tmp_path / "jobs",
                         progress=False)
    assert failures == []
    attempts = [tuple(map(int, line.split())) for line in (work / "attempts").read_text().splitlines()]
    assert [a for a, _ in attempts] == [0, 1]  # started, requeued once by Slurm (restart count 1)
    assert attempts[0][1] == 0 and attempts[1][1] >= 1  # the second attempt found the first one's progress
    assert int((work / "progress").read_text()) == attempts[1][1] + 3
    (log,) = (tmp_path / "jobs").glob("*/*_0_log.err")
    assert "Caught signal SIGUSR2" in log.read_text() and "this job is timed-out" in log.read_text()


def test_a_failing_run_is_named_with_its_log_and_the_other_finishes(cluster, tmp_path):
    calls = [Call("good", sleep_for, (0.0,)), Call("bad", fail_with, ("the data root is missing",))]
    failures = run_calls(calls, ExecutorSettings(kind="slurm", parallel=2, poll_seconds=0.5), tmp_path / "jobs",
                         progress=False)
    assert [f.name for f in failures] == ["bad"] and "the data root is missing" in failures[0].error
    assert "the data root is missing" in Path(failures[0].log).read_text()


def test_a_job_killed_by_slurm_is_reported_instead_of_waited_for(cluster, tmp_path):
    def cancel_when_running():
        _wait_for(lambda: any(s == "RUNNING" for _, s in cluster.queue()), 60, "the job running")
        subprocess.run(["scancel", "--full", "--user", "root"], check=True)

    canceller = threading.Thread(target=cancel_when_running)
    canceller.start()
    started = time.monotonic()
    failures = run_calls([Call("endless", sleep_for, (600.0,))], ExecutorSettings(kind="slurm", poll_seconds=0.5),
                         tmp_path / "jobs", progress=False)
    canceller.join()
    assert time.monotonic() - started < 120  # noticed through squeue (no accounting), not after the 600 s
    assert [f.name for f in failures] == ["endless"]
    assert "ended without a result (state: CANCELLED" in failures[0].error and failures[0].log


def test_a_request_the_partition_cannot_meet_is_refused_before_submission(cluster, tmp_path):
    call = [Call("r", sleep_for, (0.0,))]
    before = cluster.queue()
    with pytest.raises(ConfigError, match=r"partition 'debug' cannot give 1 GPU\(s\) per run; --gpus-per-run 0 runs "
                                          r"on its CPUs: it has 1 node\(s\), at most \d+ CPUs, \d+ GiB and 0 GPU\(s\)"):
        submit_slurm(call, ExecutorSettings(kind="slurm", partition="debug", gpus_per_job=1), tmp_path / "jobs")
    with pytest.raises(ConfigError, match=r"cannot give 4096 CPUs per run"):
        submit_slurm(call, ExecutorSettings(kind="slurm", cpus_per_task=4096), tmp_path / "jobs")
    with pytest.raises(ConfigError, match=r"partition 'gpu' does not exist on this cluster; choose one of \['debug'\]"):
        submit_slurm(call, ExecutorSettings(kind="slurm", partition="gpu"), tmp_path / "jobs")
    assert cluster.queue() == before and not (tmp_path / "jobs").exists()  # nothing was submitted
